"""Evaluation: held-out loss / perplexity / bits per byte, log-likelihood scoring, and
the lm-evaluation-harness adapter (llm.eval.lm_eval_adapter, needs the `eval` extra)."""
