"""Labels are -100 exactly on the prompt tokens, token by token; training and inference share one template."""
import pytest

from utils.templates import ALPACA_SYSTEM_INPUT, Template, alpaca_messages, get_template


def _check_labels(ids, labels, prompt_len, answer_ids):
    assert len(ids) == len(labels)
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:prompt_len + len(answer_ids)] == answer_ids
    assert ids[prompt_len:prompt_len + len(answer_ids)] == answer_ids
    assert all(l == -100 for l in labels[prompt_len + len(answer_ids):])


def test_chat_template_labels_token_by_token(tokenizer):
    tmpl = get_template("chat", tokenizer)
    msgs = alpaca_messages("What is 2 + 3?", "", "2 + 3 = 5.\nThe answer is 5.")
    ids, labels = tmpl.encode(tokenizer, msgs)
    # Independent reference: the tokenizer's own apply_chat_template.
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("2 + 3 = 5.\nThe answer is 5.<|im_end|>", add_special_tokens=False)["input_ids"]
    _check_labels(ids, labels, len(prompt_ids), answer_ids)
    assert answer_ids[-1] == tokenizer.eos_token_id  # the model learns to stop


def test_alpaca_template_labels_and_eos(tokenizer):
    tmpl = get_template("alpaca")
    msgs = alpaca_messages("Add the numbers.", "4 and 5", "9")
    ids, labels = tmpl.encode(tokenizer, msgs)
    prompt = (ALPACA_SYSTEM_INPUT + "\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n4 and 5\n\n### Response:\n")
    prefix = tmpl._prefix_ids(tokenizer)
    prompt_ids = prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("9", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    _check_labels(ids, labels, len(prompt_ids), answer_ids)
    assert ids == prompt_ids + answer_ids
    assert tmpl.prompt_ids(tokenizer, msgs[:1]) == prompt_ids


@pytest.mark.parametrize("name", ["chat", "alpaca", "vicuna", "chatml"])
def test_multi_turn_trains_every_answer_and_nothing_else(tokenizer, name):
    tmpl = get_template(name, tokenizer)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "Four"}]
    ids, labels = tmpl.encode(tokenizer, msgs)
    trained = tokenizer.decode([t for t, l in zip(ids, labels) if l != -100])
    assert "Hello there" in trained and "Four" in trained
    assert "Hi" not in trained and "2+2" not in trained and "Be brief" not in trained
    # The prompt for turn 2 is exactly the training prefix before the second answer.
    prompt = tmpl.prompt_ids(tokenizer, msgs[:4])
    assert ids[:len(prompt)] == prompt
    assert labels[len(prompt)] != -100 and labels[len(prompt) - 1] == -100


def test_train_on_inputs(tokenizer):
    tmpl = get_template("alpaca")
    ids, labels = tmpl.encode(tokenizer, alpaca_messages("Say hi", "", "hi"), train_on_inputs=True)
    assert labels == ids


@pytest.mark.parametrize("name", ["chat", "alpaca"])
def test_template_json_round_trip_is_byte_identical(tokenizer, name):
    tmpl = get_template(name, tokenizer)
    text = tmpl.to_json()
    again = Template.from_json(text)
    assert again == tmpl and again.to_json() == text


def test_stop_tokens_include_end_of_turn(tokenizer):
    tmpl = get_template("chat", tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in tmpl.stop_token_ids(tokenizer)


def test_chat_default_falls_back_to_alpaca_without_a_chat_template(tokenizer):
    import copy

    from utils.templates import pick_template

    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    assert pick_template(None, "chat", base).name == "alpaca"
    assert pick_template(None, "chat", tokenizer).name == "chat"
    assert pick_template("vicuna", "chat", base).name == "vicuna"
    with pytest.raises(Exception, match="has no chat template"):
        pick_template("chat", "chat", base)
