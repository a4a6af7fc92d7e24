"""Generation shared by every script: one prompt (streamed or not), batches with left padding, chat."""


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
    import torch

    input_ids = torch.tensor([ids], device=model.device)
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **gen_kwargs)
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    if stream is None:
        result, sent = {}, 0
        _generate_into(result, model, kwargs)
    else:
        result, streamed, sent = _generate_streamed(model, tokenizer, kwargs, stream, stop)
    if "error" in result:
        raise result["error"]
    new = result["out"][0, len(ids):]
    text = tokenizer.decode(new, skip_special_tokens=True) if stream is None else streamed
    return _finish(text, new, gen_kwargs, stop, stream, sent)


def _generate_into(result, model, kwargs, streamer=None):
    """model.generate(**kwargs) into result["out"], or the exception it raised into result["error"]."""
    import torch

    try:
        with torch.no_grad():
            result["out"] = model.generate(**kwargs, **({"streamer": streamer} if streamer else {}))
    except BaseException as exc:  # the reader must not wait for text that never comes
        result["error"] = exc
        if streamer is not None:
            streamer.end()


def _generate_streamed(model, tokenizer, kwargs, stream, stop):
    """Generate in a thread and pass the text to stream() as it comes, holding back what may still become a stop
    string; returns (result of _generate_into, the whole text, how many characters were sent)."""
    import threading

    from transformers import StoppingCriteriaList, TextIteratorStreamer

    result = {}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancel = threading.Event()  # set when the reader fails: generation stops at the next token
    kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), _Cancel(cancel)])
    thread = threading.Thread(target=_generate_into, args=(result, model, kwargs), kwargs={"streamer": streamer},
                              daemon=True)
    thread.start()
    pieces, sent = [], 0
    hold = max((len(s) for s in stop or []), default=1) - 1  # a stop string may still be forming
    try:
        for piece in streamer:
            pieces.append(piece)
            text = "".join(pieces)
            cut = _stop_cut(text, stop)
            safe = cut if cut is not None else len(text) - hold
            if safe > sent:
                stream(text[sent:safe])
                sent = safe
    except BaseException:
        cancel.set()
        thread.join()
        raise
    thread.join()
    return result, "".join(pieces), sent


def _finish(text, new, gen_kwargs, stop, stream, sent):
    """Cut the text at the first stop string, stream what was not sent yet, and name why generation ended."""
    cut = _stop_cut(text, stop)
    if cut is not None:
        text = text[:cut]
    if stream is not None and len(text) > sent:
        stream(text[sent:])
    n_new = int(new.shape[0])
    ended = n_new and int(new[-1]) in set(gen_kwargs.get("eos_token_id") or [])
    reason = "stop" if ended or cut is not None or n_new < gen_kwargs.get("max_new_tokens", 1 << 30) else "length"
    return text.strip(), reason, n_new


def _Cancel(event):
    from transformers import StoppingCriteria
    import torch

    class Cancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return Cancel()


def generate_batch(model, tokenizer, prompts, gen_kwargs, strip=True):
    """Answers (decoded; stripped unless strip=False: code keeps its indentation) for a batch of prompt token ids,
    generated together with left padding."""
    import torch

    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
    texts = [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    return [t.strip() for t in texts] if strip else texts


def generate_missing(items, cache, model, tokenizer, gen_kwargs, batch_size, record, progress=None):
    """Generate for the items whose key is not in the cache yet, in length-sorted batches, and store each result
    as it is made: `items` are dicts with "key" and "ids"; record(item, text) -> the dict the cache keeps;
    progress(n) is called after each batch of n."""
    todo = sorted((it for it in items if it["key"] not in cache), key=lambda it: len(it["ids"]))
    for b in range(0, len(todo), batch_size):
        batch = todo[b:b + batch_size]
        for it, text in zip(batch, generate_batch(model, tokenizer, [it["ids"] for it in batch], gen_kwargs)):
            cache.put(dict(record(it, text), key=it["key"]))
        if progress is not None:
            progress(len(batch))


def _stop_cut(text, stop):
    hits = [text.find(s) for s in (stop or []) if s and s in text]
    return min(hits) if hits else None


def generate_reply(model, tokenizer, template, messages, gen_args, stream=None, stop=None):
    """Answer the conversation (ending with a user turn) with the template it was trained with."""
    ids = template.prompt_ids(tokenizer, messages)
    text, _, _ = generate_ids(model, tokenizer, ids, generation_kwargs(gen_args, tokenizer, template), stream, stop)
    return text


def chat_loop(model, tokenizer, template, gen_args, system=None, read=None, write=print):
    """Interactive multi-turn chat: /clear forgets the history, /exit (or EOF) quits."""
    read = read or input  # looked up at call time (a test or a caller may replace builtins.input)
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
