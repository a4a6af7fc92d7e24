"""LLM judges over any OpenAI-compatible endpoint (our own server.py included): flags, client, a thread pool.

Used by the belle task (a reference-based score) and the pairwise task (A vs B). Judge answers are cached by the
tasks, keyed by judge model and the exact message, so a rerun asks nothing twice.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

from utils.errors import UserError
from utils.openai_client import OpenAIClient, RequestFailed


@dataclass
class JudgeArguments:
    judge_base_url: Optional[str] = field(
        default=None, metadata={"help": "belle / pairwise: base URL of an OpenAI-compatible API for the judge, e.g. "
                                        "http://127.0.0.1:8000/v1 (without it only the answers are generated)."})
    judge_model: Optional[str] = field(default=None, metadata={"help": "belle / pairwise: the judge's model name."})
    judge_api_key: Optional[str] = field(
        default=None, metadata={"help": "belle / pairwise: API key of the judge endpoint (default: $OPENAI_API_KEY, "
                                        "else none)."})
    judge_max_tokens: int = field(default=256, metadata={"min": 1, "help": "belle / pairwise: maximum tokens of a "
                                                                           "judge answer."})
    judge_workers: int = field(default=4, metadata={"min": 1, "max": 64, "help": "belle / pairwise: judge requests "
                                                                                 "in flight at once."})
    judge_timeout: float = field(default=120.0, metadata={"gt": 0, "help": "belle / pairwise: seconds to wait for one "
                                                                           "judge answer."})


class Judge:
    """One judge: chat completions at temperature 0; a failure for good is one sentence naming the flags."""

    def __init__(self, base_url, model, api_key=None, max_tokens=256, timeout=120.0, max_retries=2):
        self.base_url, self.model = base_url.rstrip("/"), model
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = OpenAIClient(base_url, model, api_key, timeout=timeout, max_retries=max_retries,
                                   sampling={"temperature": 0, "max_tokens": max_tokens})

    def __call__(self, content, system=None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        try:
            text, _ = self.client.chat(messages)
            return text
        except RequestFailed as exc:
            raise UserError(f"the judge at {self.base_url} (model '{self.model}') failed: {exc}; check "
                            "--judge_base_url, --judge_model and --judge_api_key (answers so far are cached)") from None


def judge_from_args(eval_args, task):
    if not eval_args.judge_model:
        raise UserError(f"--task {task} with --judge_base_url needs --judge_model (the judge's model name there)")
    return Judge(eval_args.judge_base_url, eval_args.judge_model, eval_args.judge_api_key, eval_args.judge_max_tokens,
                 eval_args.judge_timeout)


def run_all(func, jobs, workers):
    """func(job) for every job on a thread pool; the first error cancels what has not started and is raised."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    if not jobs:
        return
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        futures = [pool.submit(func, job) for job in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in done:
            if fut.exception() is not None:
                raise fut.exception()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
