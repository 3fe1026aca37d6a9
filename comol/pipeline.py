"""The former home of the job; it lives in comol/job.py now (``comol.pipeline.run`` stays importable)."""

from comol.job import Job, finite_results, run, write_results  # noqa: F401

__all__ = ["Job", "finite_results", "run", "write_results"]
