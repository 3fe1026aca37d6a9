"""Schema of the ``eval`` group (comol/conf/eval/*.yaml): one class per kind of task, told apart by
``eval.task``. Kept on its own so that it can move next to the task code when evaluation tasks become
registered plug-ins (each task then declares its own class, as adapters do).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import ConfigDict, Discriminator, Field, Tag, model_validator

from comol.errors import ConfigError
from comol.schema_base import Fraction, Key, NonEmptyStr, PosFloat, PosInt, Schema, Seed, invalid

TOY_SET = "toy_math"          # eval.sets.<name>: toy_math = the held-out split of dataset=toy_math
MAX_SAMPLES = 1000            # completions per prompt


class Decoding(Schema):
    """Every decoding field is explicit (a model's own generation_config cannot turn greedy into sampling)."""

    do_sample: bool = Key("sample (true) or greedy (false)", default=False)
    num_samples: Annotated[int, Field(ge=1, le=MAX_SAMPLES)] = Key("completions per prompt (greedy: 1)", default=1)
    temperature: PosFloat = Key("sampling temperature", default=1.0)
    top_p: Fraction = Key("nucleus sampling mass", default=1.0)
    seed: Seed = Key("sampling seed", default=0)

    @model_validator(mode="after")
    def _greedy_is_one(self) -> "Decoding":
        if not self.do_sample and self.num_samples > 1:
            raise ConfigError(f"eval.decoding.num_samples={self.num_samples} is invalid with do_sample=false: greedy "
                              f"decoding gives one answer (set eval.decoding.do_sample=true)")
        return self


class EvalCommon(Schema):
    sets: dict[str, NonEmptyStr] = Key("{set name: file under data_dir, or toy_math}", default={})
    data_dir: NonEmptyStr | None = Key("folder of the set files (null: paths as given)", default=None)
    limit: PosInt | None = Key("score only the first N rows of each set (null: all)",
                               expected="a positive integer (rows per set) or null (all rows)", default=None)
    batch_size: PosInt = Key("prompts per generation batch", default=16)
    max_new_tokens: PosInt = Key("generated tokens per answer")
    decoding: Decoding = Key("decoding settings", default_factory=Decoding)


class GenerationEval(EvalCommon):
    """Generate an answer per row and score it (math: last number; commonsense: first label)."""

    task: Literal["math", "commonsense"] = Key("the scorer")


class CodeEval(EvalCommon):
    """HumanEval-style: sampled completions run confined by the OS, pass@k."""

    task: Literal["code"] = Key("program synthesis, scored by running the tests")
    prompt_style: Literal["raw", "alpaca"] = Key("raw: continue the prompt | alpaca: wrap it in the template",
                                                 default="raw")
    ks: list[PosInt] = Key("pass@k reported for k <= num_samples", expected="a list of positive integers",
                           default=[1], min_length=1)
    timeout: PosFloat = Key("seconds per program", default=3.0)
    memory_mb: Annotated[int, Field(ge=64)] = Key("memory limit per program (MB)", default=1024)
    workers: Annotated[int, Field(ge=1, le=256)] = Key("programs run at once", default=4)
    execute: bool = Key("run the programs (false: only write the samples file)", default=True)
    allow_unconfined: bool = Key("run WITHOUT OS confinement when it is unavailable (logged)", default=False)


class NoEval(EvalCommon):
    """No evaluation (eval=none)."""

    task: Literal["none"] = Key("no evaluation")
    max_new_tokens: Annotated[int, Field(ge=0)] = Key("unused", default=0)

    @model_validator(mode="after")
    def _no_sets(self) -> "NoEval":
        if self.sets:
            raise ConfigError(invalid("eval.sets", self.sets, "{} with eval.task=none (choose eval=<task> to score "
                                                              "sets)"))
        return self


class PluginEval(EvalCommon):
    """A plug-in task (``plugins=[...]``, docs/evaluation.md): the common keys are checked here, the task's own
    keys by its registered config class (comol/eval/tasks) before anything is built."""

    model_config = ConfigDict(extra="allow")
    task: NonEmptyStr = Key("a registered plug-in task")
    max_new_tokens: Annotated[int, Field(ge=0)] = Key("generated tokens per answer", default=0)


TASKS = ("math", "commonsense", "code", "none")
PLUGIN = "plugin"


def _task_kind(node) -> str:
    task = node.get("task") if isinstance(node, dict) else getattr(node, "task", None)
    return task if task in TASKS else PLUGIN


EvalConfig = Annotated[Union[Annotated[GenerationEval, Tag("math")], Annotated[GenerationEval, Tag("commonsense")],
                             Annotated[CodeEval, Tag("code")], Annotated[NoEval, Tag("none")],
                             Annotated[PluginEval, Tag(PLUGIN)]],
                       Discriminator(_task_kind)]


def toy_sets(ev: EvalCommon) -> list[str]:
    return [name for name, source in ev.sets.items() if source == TOY_SET]
