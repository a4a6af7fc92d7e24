"""The Gradio chat demo of web.py: multi-turn chat, streamed replies, sampling controls, model line.

`build_demo(...)` returns a `gr.Blocks` app (tests launch it in-process); `stream_chat(...)` is the
streaming generator behind it, usable without a browser. Generation runs one request at a time: the
generate event has a concurrency limit of 1 and a lock guards the model as well.
"""
import dataclasses
import os
import queue
import threading

from utils.generation import generate_ids, generation_kwargs

DEFAULT_PORT = 7860
_DONE = object()


def model_line(info):
    """The one line that says what is loaded (shown above the chat)."""
    adapter = f"`{info['adapter']}` ({info['peft_type']})" if info.get("adapter") else "none"
    return (f"**Base model:** `{info['base_model']}` · **model type:** `{info['model_type']}` · "
            f"**adapter:** {adapter} · **template:** `{info['template']}`")


def _text(content):
    """Plain text of a chat message's content (Gradio 6 sends a list of parts; older ones a string)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return "" if content is None else str(content)


def to_messages(history, system=None):
    """Chatbot history (messages format) -> the conversation the template renders."""
    messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for m in history or []:
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        if role in ("user", "assistant"):
            messages.append({"role": role, "content": _text(content)})
    return messages


def stream_chat(model, tokenizer, template, messages, gen_args, lock=None):
    """Yield the reply to `messages` (ending with a user turn) as it grows, token by token.

    Generation runs in a worker thread that feeds a queue through generate_ids' stream callback; the last
    value yielded is the final, stripped reply. An error in generation is raised here. Closing the generator
    early (Gradio cancels it on Clear or when the page goes away) stops the generation at the next token.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    lock = lock or threading.Lock()
    stopped = threading.Event()
    pieces = queue.Queue()
    outcome = {}

    class _Stopped(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), stopped.is_set(), dtype=torch.bool, device=input_ids.device)

    def work():
        try:
            with lock:
                if stopped.is_set():
                    return
                kwargs = generation_kwargs(gen_args, tokenizer, template)
                kwargs["stopping_criteria"] = StoppingCriteriaList([_Stopped()])
                ids = template.prompt_ids(tokenizer, messages)
                outcome["text"], _, _ = generate_ids(model, tokenizer, ids, kwargs, stream=pieces.put)
        except BaseException as exc:  # handed to the consumer below
            outcome["error"] = exc
        finally:
            pieces.put(_DONE)

    threading.Thread(target=work, name="web-generate", daemon=True).start()
    try:
        partial = ""
        while True:
            piece = pieces.get()
            if piece is _DONE:
                break
            partial += piece
            yield partial
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["text"]
    finally:
        stopped.set()


def _controls(gr, gen_args, system):
    """The right-hand column: system prompt and sampling controls, their starting values from the flags."""
    system_box = gr.Textbox(value=system or "", label="System prompt", lines=3, elem_id="system",
                            placeholder="(the template's default)")
    do_sample = gr.Checkbox(value=gen_args.do_sample, label="do_sample (off: greedy decoding)")
    temperature = gr.Slider(0.01, 2.0, value=max(gen_args.temperature, 0.01), step=0.01, label="temperature")
    top_p = gr.Slider(0.01, 1.0, value=gen_args.top_p, step=0.01, label="top_p")
    top_k = gr.Slider(0, 200, value=gen_args.top_k, step=1, label="top_k (0: off)")
    max_new_tokens = gr.Slider(1, 2048, value=gen_args.max_new_tokens, step=1, label="max_new_tokens")
    repetition_penalty = gr.Slider(1.0, 2.0, value=gen_args.repetition_penalty, step=0.01, label="repetition_penalty")
    return [system_box, temperature, top_p, top_k, max_new_tokens, repetition_penalty, do_sample]


def add_user(text, history):
    history = list(history or [])
    if text and text.strip():
        history.append({"role": "user", "content": text.strip()})
    return "", history


def _responder(gr, model, tokenizer, template, gen_args, lock):
    """The streaming reply handler: the history grows by the assistant's partial answer, token by token."""
    def respond(history, system_prompt, temp, p, k, n_new, rep, sample):
        history = list(history or [])
        if not history or history[-1].get("role") != "user":
            yield history
            return
        args = dataclasses.replace(gen_args, temperature=float(temp), top_p=float(p), top_k=int(k),
                                   max_new_tokens=int(n_new), repetition_penalty=float(rep),
                                   do_sample=bool(sample), num_beams=1)  # beam search cannot stream
        messages = to_messages(history, system_prompt)
        history.append({"role": "assistant", "content": ""})
        try:
            for partial in stream_chat(model, tokenizer, template, messages, args, lock):
                history[-1] = {"role": "assistant", "content": partial}
                yield history
        except Exception as exc:
            raise gr.Error(f"generation failed: {exc}") from exc
        if not history[-1]["content"]:
            gr.Warning("The model returned an empty reply (only whitespace or special tokens).")

    return respond


def build_demo(model, tokenizer, template, info, gen_args=None, system=None, title="Alpaca-CoT chat"):
    """The chat app: gr.Blocks with a chatbot, a message box, Send / Clear, a system prompt and sampling."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # private by default: no usage statistics
    import gradio as gr

    from utils.args import GenerationArguments

    gen_args = gen_args or GenerationArguments()
    respond = _responder(gr, model, tokenizer, template, gen_args, threading.Lock())
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}")
        gr.Markdown(model_line(info), elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=460, buttons=["copy"],
                                     feedback_options=None)
                message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                     elem_id="message", lines=1, max_lines=6, autofocus=True)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1, min_width=260):
                controls = _controls(gr, gen_args, system)
        events = [trigger(add_user, [message, chatbot], [message, chatbot], queue=False).then(
                  respond, [chatbot, *controls], chatbot, concurrency_limit=1, concurrency_id="generate")
                  for trigger in (message.submit, send.click)]
        clear.click(lambda: ("", []), None, [message, chatbot], cancels=events)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(demo, host="127.0.0.1", port=DEFAULT_PORT, block=True):
    """Serve the app on host:port (127.0.0.1 unless told otherwise); never through a public share link."""
    return demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
                       prevent_thread_lock=not block, show_error=True, quiet=not block,
                       footer_links=[])
