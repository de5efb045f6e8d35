"""SFT data: chat template, multi-turn expansion, encoding, EOS padding, bad input."""

import json

import pytest

from lldiff.data.chat import ChatTemplate, Message, Turn, expand_turns, parse_record
from lldiff.data.line_tasks import distinct_lines, line_tasks, windows
from lldiff.data.sft import collate, encode_turns, load_turns, read_jsonl, split_turns
from lldiff.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["User: hello there\nAssistant: general kenobi\n" * 20], 259)


CONVERSATION = [
    Message("system", "be brief"),
    Message("user", "hi"),
    Message("assistant", "hello"),
    Message("user", "2+2?"),
    Message("assistant", "4"),
]


def test_template_round_trip():
    template = ChatTemplate()
    text = template.render(CONVERSATION)
    assert text == "System: be brief\nUser: hi\nAssistant: hello\nUser: 2+2?\nAssistant: 4\n"
    assert template.parse(text) == CONVERSATION
    custom = ChatTemplate(system="<s>{content}</s>", user="[U]{content}[/U]", assistant="[A]{content}[/A]\n")
    tricky = [Message("user", "a [/U] b {x} \n"), Message("assistant", "multi\nline [U] text")]
    assert custom.parse(custom.render(tricky)) == tricky
    with pytest.raises(ValueError, match="does not open a message"):
        template.parse("Robot: hi\n")


def test_prompt_is_history_plus_generation_prefix():
    template = ChatTemplate()
    turns = expand_turns(CONVERSATION)
    assert template.render_prompt(turns[1].history) == "System: be brief\nUser: hi\nAssistant: hello\nUser: 2+2?\nAssistant: "
    # a prompt followed by its response and the assistant suffix is the full rendering
    assert template.render_prompt(turns[1].history) + turns[1].response + "\n" == template.render(CONVERSATION)


def test_multi_turn_expansion_gives_one_example_per_assistant_turn():
    turns = expand_turns(CONVERSATION)
    assert turns == [Turn(tuple(CONVERSATION[:2]), "hello"), Turn(tuple(CONVERSATION[:4]), "4")]


@pytest.mark.parametrize("pattern, message", [
    ({"assistant": "Assistant: "}, "has no {content} placeholder.*response slot"),
    ({"user": "{content} and {content}"}, "has 2 {content}"),
    ({"robot": "{content}"}, "unknown template role"),
])
def test_bad_templates_are_named(pattern, message):
    with pytest.raises(ValueError, match=message):
        ChatTemplate.from_config(pattern)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot'; allowed: system, user, assistant"),
    ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
    ({"text": "hi"}, "needs 'messages'.*or 'prompt' and 'response'"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_records_are_named_with_their_line(record, message):
    with pytest.raises(ValueError, match="f.jsonl:7: .*" + message):
        parse_record(record, "f.jsonl:7")


def test_malformed_jsonl_reports_the_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": \n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: malformed JSON"):
        read_jsonl(path)


def test_pairs_and_conversations_load_together(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n"
                    + json.dumps({"messages": [{"role": r, "content": c} for r, c in
                                               [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]]}) + "\n")
    turns = load_turns([path])
    assert [t.response for t in turns] == ["r", "b", "d"]
    assert turns[2].history == (Message("user", "a"), Message("assistant", "b"), Message("user", "c"))


def test_encoding_layout_and_eos_padding(tokenizer):
    template = ChatTemplate()
    turn = Turn((Message("user", "hi"),), "yo")
    [encoded], _stats = encode_turns([turn], tokenizer, template, max_length=64)
    eos = tokenizer.eos_id
    assert encoded.prompt[0] == eos
    assert tokenizer.decode(encoded.prompt[1:]) == "User: hi\nAssistant: "
    assert tokenizer.decode(encoded.response[:-1]) == "yo" and encoded.response[-1] == eos
    short = encode_turns([Turn((Message("user", "a"),), "b")], tokenizer, template, max_length=64)[0][0]
    batch = collate([encoded, short], eos_id=eos)
    ids, response = batch["input_ids"], batch["response_mask"]
    assert ids.shape[1] == max(len(encoded), len(short))
    for row, example in enumerate([encoded, short]):
        p = len(example.prompt)
        assert batch["prompt_lengths"][row] == p
        assert not response[row, :p].any() and response[row, p:].all()  # response + all EOS padding
        assert (ids[row, len(example):] == eos).all()
    fixed = collate([short], eos_id=eos, pad_to=40)
    assert fixed["input_ids"].shape == (1, 40) and fixed["response_mask"][0, len(short.prompt):].all()


def test_overlong_examples_are_truncated_or_dropped_and_counted(tokenizer):
    template = ChatTemplate()
    long_prompt = Turn((Message("user", "x " * 40),), "ok")
    long_answer = Turn((Message("user", "q"),), "y " * 40)
    fits = Turn((Message("user", "q"),), "a")
    kept, stats = encode_turns([long_prompt, long_answer, fits], tokenizer, template, max_length=24)
    assert (stats.examples, stats.truncated, stats.dropped) == (3, 2, 0)
    assert all(len(e) <= 24 for e in kept)
    prefix = tokenizer.encode("Assistant: ")
    assert kept[0].prompt[-len(prefix):] == tuple(prefix)  # the generation prefix survives
    assert tokenizer.decode(kept[0].response) == "ok<|eos|>"  # the response is intact
    assert kept[1].response[-1] != tokenizer.eos_id  # a cut response does not claim to end
    dropped, stats = encode_turns([long_prompt, long_answer, fits], tokenizer, template, max_length=24,
                                  overlong="drop")
    assert (stats.truncated, stats.dropped, len(dropped)) == (0, 2, 1)
    with pytest.raises(ValueError, match="overlong='cut'; allowed: truncate, drop"):
        encode_turns([fits], tokenizer, template, max_length=24, overlong="cut")


def test_split_is_deterministic_and_disjoint():
    turns = [Turn((Message("user", str(i)),), str(i)) for i in range(400)]
    train, val = split_turns(turns, 0.25)
    assert split_turns(list(reversed(turns)), 0.25)[1] == list(reversed(val))
    assert len(train) + len(val) == 400 and 60 < len(val) < 140
    assert not {t.response for t in train} & {t.response for t in val}


def test_datamodule_batches_and_bad_input(tmp_path, tokenizer):
    from lldiff.data import SFTDataModule

    tok_path = tokenizer.save(tmp_path / "run" / "tokenizer.json")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a" * (i % 5 + 1)}) + "\n" for i in range(40)))
    dm = SFTDataModule([str(data)], str(tmp_path / "run"), val_fraction=0.2, batch_size=4, max_length=32)
    dm.setup("fit")
    assert dm.vocab_size_real == tokenizer.vocab_size
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "response_mask", "prompt_lengths"} and batch["input_ids"].shape[0] == 4
    assert len(dm.val_examples) + len(dm.train_examples) == 40
    with pytest.raises(ValueError, match="pad_to='row'; allowed: batch, fixed"):
        SFTDataModule([str(data)], str(tok_path), pad_to="row")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json there"):
        SFTDataModule([str(data)], str(tmp_path))
    with pytest.raises(ValueError, match="response slot"):
        SFTDataModule([str(data)], str(tok_path), template={"assistant": "A:"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        SFTDataModule([str(bad)], str(tok_path)).setup("fit")


def test_line_tasks_hold_out_whole_blocks():
    text = "\n".join(f"line number {i:03d}" for i in range(64)) + "\nline number 007\n"
    lines = distinct_lines(text)
    assert "line number 007" not in lines and len(lines) == 63  # a repeated line is ambiguous: removed
    tasks = line_tasks(lines, block=8, seed=0)
    trained = {(r["prompt"].split(": ", 1)[1], r["response"]) for r in tasks.train}
    queried = [(r["prompt"].split(": ", 1)[1], r["response"]) for r in tasks.eval_forward + tasks.eval_reversal]
    assert queried and tasks.train
    for a, b in queried:  # no evaluated pair of neighbours was fine-tuned on, in either direction
        assert (a, b) not in trained and (b, a) not in trained
    index = {line: i for i, line in enumerate(lines)}
    assert all(index[r["response"]] == index[r["prompt"].split(": ", 1)[1]] + 1 for r in tasks.eval_forward)
    assert all(index[r["response"]] == index[r["prompt"].split(": ", 1)[1]] - 1 for r in tasks.eval_reversal)
    assert windows(["a", "b", "c"], 2) == ["a\nb", "b\nc"]


def test_pretraining_text_repeats_each_window_in_shuffled_orders(tmp_path):
    from lldiff.data.line_tasks import write_line_tasks

    lines = [f"line number {i:03d}" for i in range(40)]
    paths = write_line_tasks(line_tasks(lines, block=8), tmp_path, window=4, copies=3)
    docs = paths["pretrain"].read_text().strip().split("\n\n")
    expected = windows(lines, 4)
    assert sorted(docs) == sorted(expected * 3)  # every window 3 times, in forward line order inside
    passes = [docs[i * len(expected):(i + 1) * len(expected)] for i in range(3)]
    assert passes[0] != passes[1] and sorted(passes[0]) == sorted(expected)
