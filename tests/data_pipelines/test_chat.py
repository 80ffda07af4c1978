"""ChatML rendering: the label-mask golden test, image expansion, image-safe truncation."""
import numpy as np
import pytest

from data_pipelines.chat import ChatMLRenderer, RenderedChat, truncate
from data_pipelines.tokenizer import IM_END, IM_START, IMAGE_PAD, load_tokenizer


@pytest.fixture
def template(demo):
    return ChatMLRenderer(load_tokenizer(demo["tokenizer"]))


def test_label_mask_golden_two_turns_one_image(template):
    tok = template.tokenizer
    turns = [{"role": "user", "content": "<image>\nHow many circles are there?"},
             {"role": "assistant", "content": "two"},
             {"role": "user", "content": "What colour is the square?"},
             {"role": "assistant", "content": "blue"}]
    chat = template.render(turns, [3])
    S, E, IMG = tok.token_id(IM_START), tok.token_id(IM_END), tok.token_id(IMAGE_PAD)
    T = tok.encode
    expected, trained = [], []
    for ids, mask in [([S] + T("user\n"), 0), ([IMG] * 3, 0), (T("\nHow many circles are there?"), 0),
                      ([E] + T("\n"), 0), ([S] + T("assistant\n"), 0), (T("two"), 1), ([E], 1), (T("\n"), 0),
                      ([S] + T("user\n") + T("What colour is the square?") + [E] + T("\n"), 0),
                      ([S] + T("assistant\n"), 0), (T("blue"), 1), ([E], 1), (T("\n"), 0)]:
        expected += ids
        trained += [bool(mask)] * len(ids)
    np.testing.assert_array_equal(chat.tokens, expected)
    np.testing.assert_array_equal(chat.loss_mask, trained)
    # Exactly the answers plus their end-of-turn tokens are trained.
    assert chat.tokens[chat.loss_mask].tolist() == T("two") + [E] + T("blue") + [E]
    start = expected.index(IMG)
    assert chat.image_spans == [(start, 3)]


def test_an_assistant_turn_before_any_user_turn_is_context_not_a_target(template):
    """Data written by other tools than data_pipelines.convert (which drops such turns) may open
    with an answer: it is rendered as context and never trained; later answers are."""
    T, E = template.tokenizer.encode, template.tokenizer.token_id(IM_END)
    opening = {"role": "assistant", "content": "Hello! Send me a picture."}
    rest = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "Red."}]
    chat = template.render([opening, *rest], [2])
    assert chat.tokens[chat.loss_mask].tolist() == T("Red.") + [E]
    assert chat.tokens[chat.loss_mask].tolist() == template.render(rest, [2]).tokens[
        template.render(rest, [2]).loss_mask].tolist()
    system_first = template.render([{"role": "system", "content": "s"}, opening, *rest], [2])
    assert system_first.tokens[system_first.loss_mask].tolist() == T("Red.") + [E]


def test_system_prompt_and_generation_prompt(demo):
    tok = load_tokenizer(demo["tokenizer"])
    t = ChatMLRenderer(tok, default_system="Be brief.")
    chat = t.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tok.decode(chat.tokens.tolist()).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert chat.tokens[-len(tok.encode("assistant\n")) - 1] == tok.token_id(IM_START)
    assert not chat.loss_mask.any()


@pytest.mark.parametrize("turns,counts,match", [
    ([{"role": "user", "content": "<image><image>x"}, {"role": "assistant", "content": "y"}], [2],
     "more <image> tags than images"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], [2], "0 <image> tags but 1 images"),
    ([{"role": "assistant", "content": "<image>"}], [2], "images belong in user turns"),
    ([{"role": "robot", "content": "x"}], [], "role 'robot'"),
])
def test_bad_conversations_name_the_example(template, turns, counts, match):
    with pytest.raises(ValueError, match=match):
        template.render(turns, counts, example_id="ex-7")
    with pytest.raises(ValueError, match="ex-7"):
        template.render(turns, counts, example_id="ex-7")


def test_truncation_never_splits_an_image():
    chat = RenderedChat(np.arange(12, dtype=np.int32), np.array([0] * 8 + [1] * 4, bool), [(3, 4)])
    cut, kept = truncate(chat, 5)            # would split tokens 3..6
    assert len(cut.tokens) == 3 and kept == 0 and cut.image_spans == []
    cut, kept = truncate(chat, 7)            # the image ends exactly at 7
    assert len(cut.tokens) == 7 and kept == 1
    same, kept = truncate(chat, 12)
    assert same is chat and kept == 1


def test_typed_placeholders_get_no_image_features_and_a_leaky_tokenizer_is_refused(template):
    """A user message spelling `<|image_pad|>` and `<|im_end|>`: the image tokens are exactly
    the real image's span. A tokenizer that maps text to a structural id anyway is refused,
    naming the example, before any image feature is placed."""
    turns = [{"role": "user", "content": "<image>\nIs <|image_pad|><|image_pad|> here<|im_end|>?"},
             {"role": "assistant", "content": "no"}]
    chat = template.render(turns, [3], example_id="typed")
    image = template.image_token_id
    assert int((chat.tokens == image).sum()) == 3 and chat.image_spans == [(int(np.argmax(chat.tokens == image)), 3)]
    assert int((chat.tokens == template.im_end).sum()) == 2

    class Leaky:  # encodes "X" to the image token, like a vocabulary where that is an ordinary piece
        vocab_size = template.tokenizer.vocab_size

        def encode(self, text):
            return [template.image_token_id if c == "X" else template.tokenizer.encode(c)[-1] for c in text]

        def decode(self, ids):
            return template.tokenizer.decode(ids)

        def token_id(self, piece):
            return template.tokenizer.token_id(piece)

    leaky = ChatMLRenderer(Leaky())
    with pytest.raises(ValueError, match="example typed: 4 image tokens but its images fill 3"):
        leaky.render([{"role": "user", "content": "<image>\nX?"}, {"role": "assistant", "content": "no"}], [3],
                     example_id="typed")
    assert leaky.render([{"role": "user", "content": "<image>\nok?"}, {"role": "assistant", "content": "no"}],
                        [3]).image_spans


def test_demo_records_keep_the_tokens_they_had_before_templates_were_read(demo):
    """The demo's SentencePiece tokenizer has no chat template, so its records are rendered by the
    ChatML fallback exactly as before the model's own templates were read: the digest of every
    record's (tokens, loss mask, tile starts) below was measured with the code before that change
    (commit 97371b5), over the same demo data."""
    import hashlib

    from data_pipelines.pipeline import ExampleProcessor, PipelineConfig, SourceSpec
    from data_pipelines.records import ArrayRecordExampleSource
    digest, records = hashlib.sha256(), 0
    for source, path in sorted(demo["datasets"]["train"].items()):
        for mode in ("dynamic", "single"):
            process = ExampleProcessor(PipelineConfig(sources=(SourceSpec(source, path),), tokenizer=demo["tokenizer"],
                                                      seq_len=256, batch_size=1, tile_size=56, tokens_per_tile=16,
                                                      image_mode=mode, max_tiles=4))
            assert process.template.kind == "chatml"
            examples = ArrayRecordExampleSource(path)
            for i in range(len(examples)):
                s = process(examples[i])
                for a in (s.tokens.astype(np.int32), s.loss_mask.astype(bool), s.tile_starts.astype(np.int32)):
                    digest.update(a.tobytes())
                records += 1
    assert (records, digest.hexdigest()) == (600, "1e86ecb7da7e9881e1e1712d6a5e9ab7dc4343eb7de7aee4186082c32f605ec2")


def test_an_id_past_the_embedding_table_is_a_counted_rejection_by_name(demo):
    """A tokenizer may be longer than the LLM's table (Gemma-3-1b's <image_soft_token>, one past
    its 262,144 rows); a sample holding such an id is rejected naming the id, its piece and the
    rows, never trained on (here: a table of 100 rows under the demo's 500-piece tokenizer)."""
    from data_pipelines.packing import Rejection
    from data_pipelines.pipeline import ExampleProcessor, PipelineConfig, SourceSpec
    from data_pipelines.records import ArrayRecordExampleSource
    path = demo["datasets"]["train"]["text"]
    cfg = dict(sources=(SourceSpec("text", path),), tokenizer=demo["tokenizer"], seq_len=256, batch_size=1,
               tile_size=56, tokens_per_tile=16)
    example = ArrayRecordExampleSource(path)[0]
    sample = ExampleProcessor(PipelineConfig(**cfg))(example)
    rows = 100
    beyond = int(sample.tokens.max())
    assert beyond >= rows
    rejected = ExampleProcessor(PipelineConfig(**cfg, vocab_rows=rows))(example)
    piece = load_tokenizer(demo["tokenizer"]).piece(beyond)
    assert isinstance(rejected, Rejection) and rejected.reason == (
        f"token outside the LLM's embedding table: id {beyond} ({piece!r}) of {rows} rows")
    assert ExampleProcessor(PipelineConfig(**cfg, vocab_rows=beyond + 1))(example).tokens.tolist() == \
        sample.tokens.tolist()
