"""Inference shared by every script: load base (+ adapter) with its template, generate, chat."""
import json
from pathlib import Path

from utils.errors import UserError
from utils.models import EMBEDDED_ALIAS, get_spec, load_model, load_tokenizer, resolve_model
from utils.peft_methods import load_adapter
from utils.templates import Template, get_template
from utils.train import META_FILE, TEMPLATE_FILE

# The seed's documented sampling settings (Alpaca-CoT README, "Inference Hyper-parameter Explanation").
SEED_PRESET = {"do_sample": True, "temperature": 1.0, "top_p": 0.9, "no_repeat_ngram_size": 6,
               "repetition_penalty": 1.8}


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
        tmpl = get_template(template or get_spec(mtype).template, tokenizer)
        model = load_model(path, dtype, trust_remote_code, tokenizer.pad_token_id)
        model.eval()
        info = {"base_model": model_name_or_path or EMBEDDED_ALIAS, "model_type": mtype, "adapter": None, "template": tmpl.name,
                "peft_type": None}
    return model, tokenizer, tmpl, info


def generation_kwargs(gen_args, tokenizer, template):
    kw = {"max_new_tokens": gen_args.max_new_tokens, "num_beams": gen_args.num_beams,
          "repetition_penalty": gen_args.repetition_penalty, "do_sample": gen_args.do_sample,
          "eos_token_id": template.stop_token_ids(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if gen_args.no_repeat_ngram_size:
        kw["no_repeat_ngram_size"] = gen_args.no_repeat_ngram_size
    if gen_args.do_sample:
        kw.update(temperature=gen_args.temperature, top_p=gen_args.top_p, top_k=gen_args.top_k)
    return kw


def generate_reply(model, tokenizer, template, messages, gen_args, stream=None):
    """Answer the conversation (ending with a user turn); stream=callable(text) gets text as it is made."""
    import torch
    from transformers import TextIteratorStreamer

    ids = template.prompt_ids(tokenizer, messages)
    input_ids = torch.tensor([ids], device=model.device)
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  **generation_kwargs(gen_args, tokenizer, template))
    if stream is None:
        with torch.no_grad():
            out = model.generate(**kwargs)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    import threading

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=lambda: _no_grad_generate(model, streamer=streamer, **kwargs))
    thread.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        stream(piece)
    thread.join()
    return "".join(pieces).strip()


def _no_grad_generate(model, **kwargs):
    import torch

    with torch.no_grad():
        model.generate(**kwargs)


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
