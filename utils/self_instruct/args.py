"""Self-instruct flags: SelfInstructArguments (README's flags table is generated from it) and their checks."""
from dataclasses import dataclass, field
from typing import Optional

from utils.errors import UserError


@dataclass
class SelfInstructArguments:
    seed_tasks: str = field(
        default=None, metadata={"help": "Seed tasks: Alpaca's seed_tasks.jsonl layout ({instruction, instances: "
                                        "[{input, output}]}, BELLE's Chinese seeds too) or alpaca rows "
                                        "({instruction, input, output}). Required."})
    output: str = field(
        default=None, metadata={"help": "Output .jsonl of {instruction, input, output} rows, appended as they are "
                                        "kept; rerunning continues it. Statistics go to OUT.stats.json. Required."})
    base_url: str = field(
        default=None, metadata={"help": "OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (our "
                                        "server.py) or https://api.openai.com/v1. Required."})
    model: str = field(default=None, metadata={"help": "Model name sent to the endpoint. Required."})
    api_key: Optional[str] = field(
        default=None, metadata={"help": "Bearer token for the endpoint (default: $OPENAI_API_KEY, else none)."})
    num_instructions: int = field(
        default=100, metadata={"help": "Stop when the output holds this many instructions (resumed rows count)."})
    lang: str = field(
        default="auto", metadata={"help": "Language of the tasks: en, zh (Chinese header, character-level ROUGE, "
                                          "Chinese blacklist) or auto (zh when most seed instructions are Chinese).",
                                  "choices": ["auto", "en", "zh"]})
    prompt_file: Optional[str] = field(
        default=None, metadata={"help": "Text file with your own prompt header (e.g. Alpaca's prompt.txt); "
                                        "'{num_tasks}' in it is replaced. Default: our built-in header."})
    num_tasks_per_prompt: int = field(
        default=20, metadata={"help": "Length of the task list the header asks for (examples included)."})
    num_prompt_instructions: int = field(
        default=3, metadata={"help": "Examples shown in each prompt (k)."})
    num_generated_in_prompt: int = field(
        default=1, metadata={"help": "How many of the k examples are instructions generated so far (when there are "
                                     "any); the rest are seed tasks."})
    use_completions: bool = field(
        default=False, metadata={"help": "Use /completions (a base model continues the list) instead of "
                                         "/chat/completions."})
    request_batch_size: int = field(
        default=1, metadata={"help": "Prompts per batch: one /completions request carries them all (Alpaca sent 5); "
                                     "with chat each prompt is its own request, sent one after the other."})
    concurrency: int = field(default=4, metadata={"help": "Batches in flight at once (threads)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    max_tokens: int = field(default=3072, metadata={"help": "Maximum tokens per response."})
    request_timeout: float = field(default=120.0, metadata={"help": "Seconds to wait for one response."})
    max_retries: int = field(
        default=5, metadata={"help": "Retries of a request after a timeout, a connection error, HTTP 408/409/429 "
                                     "or 5xx, with exponential backoff."})
    retry_delay: float = field(
        default=1.0, metadata={"help": "First backoff delay in seconds; it doubles on each retry (at most 60 s)."})
    similarity_threshold: float = field(
        default=0.7, metadata={"help": "Reject an instruction whose ROUGE-L F1 with any kept or seed instruction "
                                       "is at least this."})
    min_words: int = field(default=3, metadata={"help": "Reject instructions shorter than this many words "
                                                        "(characters for Chinese)."})
    max_words: int = field(default=150, metadata={"help": "Reject instructions longer than this many words "
                                                          "(characters for Chinese)."})
    blacklist_extra: Optional[list[str]] = field(
        default=None, metadata={"help": "More words that reject an instruction containing them."})
    max_prompts: int = field(
        default=0, metadata={"help": "Send at most this many prompts in this run (0: no limit); a rerun continues."})
    save_rejected: bool = field(
        default=False, metadata={"help": "Also write rejected items with their reason to OUT.rejected.jsonl."})
    seed: int = field(default=42, metadata={"help": "Random seed of the example sampling."})


def validate(args):
    """UserError naming the flag to fix when the flags cannot make a run."""
    missing = [f"--{k}" for k in ("seed_tasks", "output", "base_url", "model") if not getattr(args, k)]
    if missing:
        raise UserError(f"self-instruct needs --seed_tasks FILE, --output FILE.jsonl, --base_url URL and --model NAME "
                        f"(missing: {' '.join(missing)})")
    if not args.output.endswith(".jsonl"):
        raise UserError(f"--output {args.output} must end in .jsonl (JSON lines, which --data reads)")
    checks = [(args.num_instructions >= 1, "--num_instructions must be at least 1"),
              (args.num_prompt_instructions >= 1, "--num_prompt_instructions must be at least 1"),
              (args.num_tasks_per_prompt > args.num_prompt_instructions,
               "--num_tasks_per_prompt must be larger than --num_prompt_instructions (the examples are part of "
               "the list)"),
              (args.num_generated_in_prompt >= 0, "--num_generated_in_prompt must be 0 or more"),
              (args.concurrency >= 1, "--concurrency must be at least 1"),
              (args.request_batch_size >= 1, "--request_batch_size must be at least 1"),
              (args.max_retries >= 0, "--max_retries must be 0 or more"),
              (args.max_prompts >= 0, "--max_prompts must be 0 (no limit) or more"),
              (0 < args.similarity_threshold <= 1, "--similarity_threshold must be in (0, 1]"),
              (0 <= args.min_words <= args.max_words, "--min_words must be between 0 and --max_words"),
              (args.max_tokens >= 1, "--max_tokens must be at least 1")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
