"""The README's library snippet and every block of docs/adapters_elsewhere.md run as written, in a fresh
directory; the README one with Hydra, OmegaConf, Lightning and comol's config/data/eval/models layers
unimportable (comol.adapters is a standalone library)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from comol import ROOT

#: installed before the snippet runs: importing any of these raises ImportError
BLOCKER = textwrap.dedent('''
    import sys
    BLOCKED = ("hydra", "omegaconf", "lightning", "pytorch_lightning", "lightning_fabric")
    LAYERS = ("comol.config", "comol.adapter_presets", "comol.data", "comol.eval", "comol.models",
              "comol.training", "comol.pipeline", "comol.preflight")

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED or name.startswith(LAYERS):
                raise ImportError(f"blocked in this test: {name}")

    sys.meta_path.insert(0, Block())
''')


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def run(code: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_blocker_really_blocks(tmp_path):
    for module in ("hydra", "omegaconf", "lightning", "comol.config"):
        r = run(BLOCKER + f"import {module}\n", tmp_path)
        assert r.returncode != 0 and "blocked in this test" in r.stderr, module


def test_readme_snippet_adapts_a_model_with_nothing_but_the_library(tmp_path):
    blocks = python_blocks(section((ROOT / "README.md").read_text(), "Adapters"))
    assert len(blocks) == 1 and "from comol.adapters import CoMoLConfig, inject_adapter" in blocks[0]
    assert len(blocks[0].strip().splitlines()) <= 14
    check = textwrap.dedent('''
        import sys
        from comol.adapters import load_adapter
        assert not [m for m in sys.modules if m.split(".")[0] in ("hydra", "omegaconf", "lightning")]
        torch.manual_seed(0)
        fresh = LlamaForCausalLM(model.config)
        load_adapter(fresh, "my_adapter")  # then the same backbone weights (now under the adapter's names):
        base = {k: v for k, v in model.state_dict().items() if "adapter_" not in k}
        assert not fresh.load_state_dict(base, strict=False).unexpected_keys
        model.eval(); fresh.eval()
        with torch.no_grad():
            assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
        print("OK")
    ''')
    r = run(BLOCKER + blocks[0] + check, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("OK")
    assert sorted(p.name for p in (tmp_path / "my_adapter").iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]


def test_python_c_import_needs_no_config_tree(tmp_path):
    r = run(BLOCKER + "from comol.adapters import CoMoLConfig, inject_adapter\nprint(CoMoLConfig())", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "r=16" in r.stdout and "num_experts=8" in r.stdout


DOC = ROOT / "docs" / "adapters_elsewhere.md"
TITLES = ["A plain PyTorch loop", "Hugging Face `Trainer`", "TRL `SFTTrainer`", "In a notebook"]


@pytest.mark.parametrize("title", TITLES)
def test_docs_snippet_runs(title, tmp_path):
    blocks = python_blocks(section(DOC.read_text(), title))
    assert len(blocks) == 1
    r = run(blocks[0], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


def test_docs_page_has_exactly_the_tested_sections():
    text = DOC.read_text()
    assert len(python_blocks(text)) == len(TITLES)
    assert all(f"\n## {t}\n" in text for t in TITLES)
