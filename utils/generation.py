"""Inference shared by every script: load base (+ adapter) with its template, generate, chat."""
import json
from pathlib import Path

from utils.errors import UserError
from utils.models import EMBEDDED_ALIAS, get_spec, load_model, load_tokenizer, resolve_model
from utils.peft_methods import load_adapter
from utils.templates import Template, pick_template
from utils.train import META_FILE, TEMPLATE_FILE

def read_meta(lora_dir):
    meta_path = Path(lora_dir) / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{lora_dir} has no {META_FILE}; pass the --output_dir of a finished uniform_finetune.py run")
    return json.loads(meta_path.read_text(encoding="utf-8"))


def load_for_inference(lora_dir=None, model_name_or_path=None, model_type=None, template=None,
                       trust_remote_code=False, dtype="auto", keep_quantization=True):
    """(model, tokenizer, template, info): base + adapter from --lora_dir, or a base model alone.

    With --lora_dir the base model, model type and template come from the run's metadata and
    template.json (the very template used in training). A base trained quantized (qlora,
    --load_in_4bit/8bit) is loaded quantized again unless keep_quantization is False (merging).
    """
    if lora_dir:
        meta = read_meta(lora_dir)
        base = model_name_or_path or meta["base_model"]
        path, _, mtype = resolve_model(base, meta["model_type"], trust_remote_code or meta.get("trust_remote_code", False))
        tokenizer = load_tokenizer(lora_dir, trust_remote_code)
        tmpl = Template.from_json((Path(lora_dir) / TEMPLATE_FILE).read_text(encoding="utf-8"))
        bits = meta.get("quant_bits") if keep_quantization else None
        model = load_model(path, dtype, trust_remote_code, tokenizer.pad_token_id, bits)
        model = load_adapter(model, lora_dir)
        info = {"base_model": base, "model_type": mtype, "adapter": str(lora_dir), "template": tmpl.name,
                "peft_type": meta["peft_type"]}
    else:
        path, _, mtype = resolve_model(model_name_or_path, model_type, trust_remote_code)
        tokenizer = load_tokenizer(path, trust_remote_code)
        tmpl = pick_template(template, get_spec(mtype).template, tokenizer)
        model = load_model(path, dtype, trust_remote_code, tokenizer.pad_token_id)
        model.eval()
        info = {"base_model": model_name_or_path or EMBEDDED_ALIAS, "model_type": mtype, "adapter": None, "template": tmpl.name,
                "peft_type": None}
    return model, tokenizer, tmpl, info


def generation_kwargs(gen_args, tokenizer, template=None):
    """Arguments for model.generate from GenerationArguments; answers stop at EOS and the end-of-turn token."""
    stops = template.stop_token_ids(tokenizer) if template is not None else [tokenizer.eos_token_id]
    kw = {"max_new_tokens": gen_args.max_new_tokens, "num_beams": gen_args.num_beams,
          "repetition_penalty": gen_args.repetition_penalty, "do_sample": gen_args.do_sample,
          "eos_token_id": stops, "pad_token_id": tokenizer.pad_token_id}
    if gen_args.no_repeat_ngram_size:
        kw["no_repeat_ngram_size"] = gen_args.no_repeat_ngram_size
    if gen_args.do_sample:
        kw.update(temperature=gen_args.temperature, top_p=gen_args.top_p, top_k=gen_args.top_k)
    return kw


def generate_ids(model, tokenizer, ids, gen_kwargs, stream=None, stop=None):
    """Generate after the prompt token ids; returns (text, finish_reason, completion_tokens).

    stream=callable(text) receives text as it is produced; stop = strings that end the answer (not included).
    finish_reason is "stop" (EOS, end of turn or a stop string) or "length" (max_new_tokens reached).
    """
    import threading

    import torch
    from transformers import TextIteratorStreamer

    input_ids = torch.tensor([ids], device=model.device)
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **gen_kwargs)
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    result = {}

    def run(**extra):
        with torch.no_grad():
            result["out"] = model.generate(**kwargs, **extra)

    if stream is None:
        run()
        new = result["out"][0, len(ids):]
        text = tokenizer.decode(new, skip_special_tokens=True)
    else:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        thread = threading.Thread(target=run, kwargs={"streamer": streamer})
        thread.start()
        pieces, sent = [], 0
        hold = max((len(s) for s in stop or []), default=1) - 1  # a stop string may still be forming
        for piece in streamer:
            pieces.append(piece)
            text = "".join(pieces)
            cut = _stop_cut(text, stop)
            safe = cut if cut is not None else len(text) - hold
            if safe > sent:
                stream(text[sent:safe])
                sent = safe
        thread.join()
        new = result["out"][0, len(ids):]
        text = "".join(pieces)
    cut = _stop_cut(text, stop)
    if cut is not None:
        text = text[:cut]
    if stream is not None and len(text) > sent:
        stream(text[sent:])
    n_new = int(new.shape[0])
    ended = n_new and int(new[-1]) in set(gen_kwargs.get("eos_token_id") or [])
    reason = "stop" if ended or cut is not None or n_new < gen_kwargs.get("max_new_tokens", 1 << 30) else "length"
    return text.strip(), reason, n_new


def _stop_cut(text, stop):
    hits = [text.find(s) for s in (stop or []) if s and s in text]
    return min(hits) if hits else None


def generate_reply(model, tokenizer, template, messages, gen_args, stream=None, stop=None):
    """Answer the conversation (ending with a user turn) with the template it was trained with."""
    ids = template.prompt_ids(tokenizer, messages)
    text, _, _ = generate_ids(model, tokenizer, ids, generation_kwargs(gen_args, tokenizer, template), stream, stop)
    return text


def chat_loop(model, tokenizer, template, gen_args, system=None, read=input, write=print):
    """Interactive multi-turn chat: /clear forgets the history, /exit (or EOF) quits."""
    history = [{"role": "system", "content": system}] if system else []
    write("Chat with the model. /clear starts over, /exit quits.")
    while True:
        try:
            line = read("user> ")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/clear":
            history = history[:1] if system else []
            write("(history cleared)")
            continue
        history.append({"role": "user", "content": text})
        write("assistant> ", end="", flush=True)
        reply = generate_reply(model, tokenizer, template, history, gen_args,
                               stream=lambda s: write(s, end="", flush=True))
        write("")
        history.append({"role": "assistant", "content": reply})
