"""Evaluation: perplexity, shared-context log-likelihood scoring, local multiple-choice and
generation tasks (`evaluation`), and a model for lm-evaluation-harness (`harness`, the optional
`eval` extra: import llama.eval.harness)."""

from llama.eval.evaluation import (TaskError, TaskSpec, evaluate_task, evaluate_tasks, loglikelihoods, perplexity,
                                   read_documents, write_results)

__all__ = ["TaskError", "TaskSpec", "evaluate_task", "evaluate_tasks", "loglikelihoods", "perplexity",
           "read_documents", "write_results"]
