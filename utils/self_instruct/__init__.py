"""Self-instruct: grow instruction data from seed tasks with any OpenAI-compatible model (Alpaca's recipe).

    python -m utils.self_instruct --seed_tasks seed_tasks.jsonl --output generated.jsonl \\
        --base_url http://127.0.0.1:8000/v1 --model NAME --num_instructions 1000

One round: sample k examples (seed tasks, and instructions kept so far) -> write them as a numbered
instruction / input / output list under a header that asks for more tasks -> the model continues the
list -> parse its numbered items -> filter them (length, blacklist, bad start, empty output, exact
duplicate, ROUGE-L similarity to every instruction kept so far, seeds included) -> append the kept ones
to the output as alpaca JSON lines ({"instruction", "input", "output"}), which `--data` reads.
Several prompts are in flight at once (threads); failed requests are retried with exponential backoff;
a rerun of the same command continues where the last one stopped.

Modules: args (flags and their checks), prompts (seed tasks, headers, prompt encoding, parsing answers),
filters (the rejection rules and the ROUGE-L SimilarityIndex), pool (the request threads), loop (resume,
the generation loop, statistics files, main). The OpenAI client is utils/openai_client.py.
"""
from utils.self_instruct.args import SelfInstructArguments, validate
from utils.self_instruct.filters import (BAD_STARTS, BLACKLIST, RULES, CharTokenizer, InstructionFilter,
                                         SimilarityIndex, rouge_l, rouge_tokenizer)
from utils.self_instruct.loop import (SelfInstructRun, format_stats, main, read_output, rejected_path,
                                      run_self_instruct, stats_path)
from utils.self_instruct.pool import WorkerPool
from utils.self_instruct.prompts import (HEADERS, PromptBuilder, detect_lang, encode_prompt, load_seed_tasks,
                                         parse_items, parse_response, prompt_header)

__all__ = ["BAD_STARTS", "BLACKLIST", "HEADERS", "RULES", "CharTokenizer", "InstructionFilter", "PromptBuilder",
           "SelfInstructArguments", "SelfInstructRun", "SimilarityIndex", "WorkerPool", "detect_lang",
           "encode_prompt", "format_stats", "load_seed_tasks", "main", "parse_items", "parse_response",
           "prompt_header", "read_output", "rejected_path", "rouge_l", "rouge_tokenizer", "run_self_instruct",
           "stats_path", "validate"]
