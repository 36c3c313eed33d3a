"""The model's own Jinja chat template (maxmodel/data/chat_template.py) against transformers'
apply_chat_template, run out of process in .venv-hf: same rendering (with and without the generation prompt),
same assistant mask (from {% generation %} tags, and derived from the rendering when the template has none),
the template's own errors; then SFT rows whose loss counts exactly the assistant text, and bad records named
by file and line."""
import json

import hf_oracle
import numpy as np
import pytest

from maxmodel.config import ConfigError, load_config
from maxmodel.data.chat_template import ChatTemplateError, compile_template, encode_chat
from maxmodel.data.tokenizer import ByteTokenizer

# ChatML with a BOS, a default system prompt, role checks through raise_exception, tojson, loop variables
# and the generation prompt. TAGGED marks what the assistant writes (content + end of turn + the newline that
# closes its turn) for the mask: what spans derived from the rendering cover.
BODY = ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "{% endif %}{% for m in messages %}"
        "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}"
        "{% endif %}"
        "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m['content'] | trim }}"
        "<|im_end|>\n{% endgeneration %}"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% if m.get('meta') %} {{ m['meta'] | tojson }}"
        "{% endif %}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TAGGED = BODY
PLAIN = BODY.replace("{% generation %}", "").replace("{% endgeneration %}", "")
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
CHATS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello! \n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?", "meta": {"lang": "en"}},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6, é"}, {"role": "user", "content": "thanks"}],
]
BAD = [{"role": "user", "content": "x"}, {"role": "robot", "content": "beep"}, {"role": "assistant", "content": "y"}]


def char_mask(text, spans):
    mask = np.zeros(len(text), int)
    for s, e in spans:
        mask[s:e] = 1
    return mask.tolist()


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    hf_oracle.require()
    specs = [{"template": t, "special": SPECIAL, "messages": c, "mask": t is TAGGED}
             for c in CHATS for t in (TAGGED, PLAIN)] + [{"template": PLAIN, "special": SPECIAL, "messages": BAD}]
    path = tmp_path_factory.mktemp("chat") / "specs.json"
    path.write_text(json.dumps(specs))
    return hf_oracle.run("chat", str(path))


@pytest.mark.parametrize("i", range(len(CHATS)))
def test_rendering_and_assistant_mask_match_transformers(oracle, i):
    hf_tagged, hf_plain = oracle[2 * i], oracle[2 * i + 1]
    tagged, plain = compile_template(TAGGED, "t", SPECIAL), compile_template(PLAIN, "p", SPECIAL)
    assert tagged.tracked and not plain.tracked
    for ours, hf in ((tagged, hf_tagged), (plain, hf_plain)):
        assert ours.render(CHATS[i]) == hf["text"]
        assert ours.render(CHATS[i], add_generation_prompt=True) == hf["prompt"]
    text, spans = tagged.render_with_spans(CHATS[i])
    assert char_mask(text, spans) == hf_tagged["mask"]  # {% generation %} spans, as transformers records them
    text, spans = plain.render_with_spans(CHATS[i])
    assert char_mask(text, spans) == hf_tagged["mask"]  # derived from prefix renderings: the same characters
    assert sum(hf_tagged["mask"]) > 0


def test_template_errors_match_transformers(oracle):
    assert "bad role robot" in oracle[-1]["error"]
    with pytest.raises(ChatTemplateError, match="bad role robot"):
        compile_template(PLAIN, "p", SPECIAL).render(BAD)
    with pytest.raises(ConfigError, match="does not parse"):
        compile_template("{% for m in messages %}", "broken")


def test_tokens_weighted_on_assistant_text_only():
    tok = ByteTokenizer()
    template = compile_template(TAGGED, "t", SPECIAL)
    ids, weights = encode_chat(CHATS[1], template, tok)
    learned = tok.decode(ids[weights == 1])
    assert learned == "4<|im_end|>\n6, é<|im_end|>\n"
    assert tok.decode(ids) == template.render(CHATS[1])


def write_model_dir(tmp_path, records):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TAGGED, **SPECIAL}))
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in records))
    return data


def sft_config(tmp_path, data, *extra):
    return load_config(overrides=[
        "train.objective=sft", "data.source=jsonl", f"data.path={data}", "data.format=chat",
        f"data.chat_template={tmp_path / 'tokenizer_config.json'}", "data.tokenizer=bytes", "data.packing=none",
        "data.shuffle=false", "train.seq_len=256", "model.max_seq_len=256", "train.batch_size=2", "model.vocab_size=512",
        f"run.output_dir={tmp_path}", *extra])


def test_sft_rows_count_only_assistant_targets(tmp_path):
    from maxmodel.data.pipeline import make_train_data
    data = write_model_dir(tmp_path, CHATS * 20)
    cfg = sft_config(tmp_path, data)
    rows = next(make_train_data(cfg, tmp_path).train)
    tok = ByteTokenizer()
    template = compile_template(TAGGED, "t", SPECIAL)
    encoded = [encode_chat(c, template, tok) for c in CHATS]
    for r in range(2):  # packing=none with rows longer than any chat: one whole chat per row, then padding
        n = int((rows["segment_ids"][r] > 0).sum())
        ids, weights = next(e for e in encoded if len(e[0]) == n + 1 and (e[0][:n] == rows["inputs"][r][:n]).all())
        counted = rows["targets"][r][rows["loss_mask"][r] > 0]
        assert counted.tolist() == ids[1:][weights[1:] == 1].tolist()
        assert rows["loss_mask"][r][n:].sum() == 0


@pytest.mark.parametrize("record, reason", [(BAD, "unknown role 'robot'"),
                                            ([{"role": "user", "content": "only a question"}], "no assistant")])
def test_bad_chat_record_names_file_and_line(tmp_path, record, reason):
    from maxmodel.data.pipeline import make_train_data
    data = write_model_dir(tmp_path, [CHATS[0], record, CHATS[1]])
    with pytest.raises(ConfigError, match=f"{data}:2: .*{reason}"):
        make_train_data(sft_config(tmp_path, data), tmp_path)


def test_template_raising_names_file_and_line(tmp_path):
    """A role the data readers accept but this template refuses: its raise_exception, at the record's line."""
    from maxmodel.data.pipeline import make_train_data
    data = write_model_dir(tmp_path, [CHATS[0], CHATS[1], [{"role": "tool", "content": "{}"}, *CHATS[0]]])
    with pytest.raises(ConfigError, match=f"{data}:3: .*bad role tool"):
        make_train_data(sft_config(tmp_path, data), tmp_path)


def test_tokenizer_spec_reads_the_config_beside_the_tokenizer(tmp_path):
    """`data.chat_template=tokenizer`: the tokenizer_config.json that `maxmodel convert from-hf` copies into
    the model directory next to tokenizer.json (data.tokenizer)."""
    from maxmodel.data.chat_template import load_chat_template
    write_model_dir(tmp_path, CHATS)
    template = load_chat_template("tokenizer", str(tmp_path / "tokenizer.json"))
    assert template.tracked and template.render(CHATS[0]).startswith("<s><|im_start|>system")
