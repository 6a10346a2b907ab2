"""Text sources and token windows, with the real default tokenizer."""
import pytest
import torch

from analysis.data import (
    DataError,
    calibration_batches,
    calibration_text,
    eval_windows,
    evaluation_text,
    held_out_split,
    load_text,
    same_source,
    save_text,
    split_text,
    text_source_problem,
    tokenize,
)


@pytest.fixture(scope="module")
def tok(default_model):
    return default_model.tokenizer


def test_default_corpus_and_wikitext_load(wikitext_dir):
    assert len(load_text("default")) > 300_000
    assert load_text("wikitext2:test") == (wikitext_dir / "test.txt").read_text()
    assert load_text(str(wikitext_dir / "valid.txt")).startswith(" \n = ")


def test_split_text_halves_are_disjoint():
    text = load_text("default")
    calib, ev = split_text(text)
    assert text.startswith(calib + "\n")
    # the corpus repeats a few articles: the evaluation part drops those the calibration part has
    assert set(calib.splitlines()).isdisjoint(ev.splitlines())
    assert 0.45 < len(calib) / len(text) < 0.55 and len(ev) > 0.4 * len(text)
    assert split_text("one two three four", 0.4) == ("one two", "three four")
    # the same source for both roles is split, different sources are not
    assert (calibration_text("default", "default"), evaluation_text("default", "default")) == (calib, ev)


def test_embedded_corpus_is_always_split(wikitext_dir):
    """The embedded corpus calibrates on its first half and evaluates on its second, whatever the
    other source is; any other text is split only when it is named for both roles."""
    calib, ev = split_text(load_text("default"))
    assert calibration_text("default", "wikitext2:test") == calib == calibration_text("default")
    assert evaluation_text("default", "wikitext2:valid") == ev == evaluation_text("default")
    whole = load_text("wikitext2:valid")
    assert calibration_text("wikitext2:valid", "wikitext2:test") == whole
    assert calibration_text("wikitext2:valid", "wikitext2:valid") == split_text(whole)[0]
    assert evaluation_text("wikitext2:test", "default") == load_text("wikitext2:test")


def test_a_copy_of_the_evaluation_text_under_another_name_is_split_like_it(wikitext_dir, tmp_path):
    """Calibrating on a copy of the evaluation text would train on what is scored: by bytes, it is the same text."""
    whole = load_text("wikitext2:valid")
    copy = tmp_path / "my-notes.txt"
    copy.write_bytes((wikitext_dir / "valid.txt").read_bytes())
    assert calibration_text(str(copy), "wikitext2:valid") == split_text(whole)[0]
    assert evaluation_text("wikitext2:valid", str(copy)) == split_text(whole)[1]
    copy.write_text(whole + "\nand a line of my own\n")  # no longer the same text: read whole again
    assert calibration_text(str(copy), "wikitext2:valid") == whole + "\nand a line of my own\n"
    assert evaluation_text("wikitext2:valid", str(copy)) == whole


def test_calibration_is_seeded_random_windows(tok):
    text = split_text(load_text("default"))[0]
    a = calibration_batches(tok, text, n_samples=5, seqlen=64, seed=3)
    b = calibration_batches(tok, text, n_samples=5, seqlen=64, seed=3)
    c = calibration_batches(tok, text, n_samples=5, seqlen=64, seed=4)
    assert a.shape == (5, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = tokenize(tok, text).tolist()
    row = a[0].tolist()  # every row is a contiguous slice of the text's tokens
    assert any(ids[i: i + 64] == row for i in range(len(ids) - 63))


def test_token_cache_tells_tokenizers_with_the_same_name_and_size_apart():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def words(order):  # in-memory, unnamed, 10 words + <unk>: only the ids differ
        t = Tokenizer(models.WordLevel({f"w{i}": j for j, i in enumerate(order)} | {"<unk>": 10}, unk_token="<unk>"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")

    forward, backward = words(range(10)), words(range(9, -1, -1))
    assert tokenize(forward, "w0 w1 w2").tolist() == [0, 1, 2]
    assert tokenize(backward, "w0 w1 w2").tolist() == [9, 8, 7]
    assert tokenize(forward, "w0 w1 w2").tolist() == [0, 1, 2]


def test_eval_windows_are_consecutive_and_non_overlapping(tok):
    text = load_text("default")
    ids = tokenize(tok, text)
    w = eval_windows(tok, text, seqlen=100)
    assert w.shape == (len(ids) // 100, 100)
    assert torch.equal(w.reshape(-1), ids[: w.numel()])
    assert eval_windows(tok, text, seqlen=100, max_windows=3).shape == (3, 100)


def test_bos_per_window(tok):
    text = load_text("default")
    w = eval_windows(tok, text, seqlen=50, bos=True, max_windows=2)
    ids = tokenize(tok, text)
    assert torch.all(w[:, 0] == tok.bos_token_id)
    assert torch.equal(w[:, 1:].reshape(-1), ids[:98])
    c = calibration_batches(tok, text, n_samples=2, seqlen=50, bos=True)
    assert c.shape == (2, 50) and torch.all(c[:, 0] == tok.bos_token_id)


def test_text_too_short_is_a_clear_error(tok):
    with pytest.raises(ValueError, match=r"has \d+ tokens, fewer than one window of 512"):
        eval_windows(tok, "Only a few words here.", seqlen=512)
    with pytest.raises(ValueError, match=r"has \d+ tokens, fewer than one window of 256"):
        calibration_batches(tok, "Too short.", seqlen=256)
    with pytest.raises(ValueError, match=r"fewer than one window of 63 \(plus the BOS token each window starts with"):
        eval_windows(tok, "Only a few words here.", seqlen=64, bos=True)


def test_bad_sources_raise_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="Unknown WikiText-2 split"):
        load_text("wikitext2:training")
    with pytest.raises(DataError, match="hf:<dataset>"):
        load_text("hf:onlyname")
    with pytest.raises(DataError, match="No text source"):
        load_text(" ")
    with pytest.raises(DataError, match=r"cannot be read as a text file \(File name too long\)"):
        load_text("/" + "c" * 300)
    f = tmp_path / "mine.txt"
    f.write_text("hello world\n")
    assert load_text(str(f)) == "hello world\n"


def test_a_file_is_one_text_however_its_path_is_spelled(tmp_path, monkeypatch):
    """`my.txt`, `./my.txt`, its absolute path and a link to it name one text: named for calibration and
    evaluation it is cut in halves, and the search may not score on it, whatever the spelling."""
    from analysis.settings import AllocationSettings, SettingsError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.txt").write_text("".join(f"line {i} of my text\n" for i in range(100)))
    (tmp_path / "link.txt").symlink_to(tmp_path / "my.txt")
    spellings = ["my.txt", "./my.txt", f" {tmp_path}/my.txt", "link.txt", "sub/../my.txt"]
    (tmp_path / "sub").mkdir()
    for other in spellings:
        assert same_source("my.txt", other), other
        assert calibration_text("my.txt", other) == split_text(load_text("my.txt"))[0], other
        assert evaluation_text(other, "my.txt") == split_text(load_text("my.txt"))[1], other
        with pytest.raises(SettingsError, match="must not be the evaluation text"):
            AllocationSettings(method="auto", search_text=other).check_search_text("my.txt")
    assert not same_source("my.txt", "default") and not same_source("wikitext2:test", "wikitext2:valid")
    assert calibration_text("my.txt", "other.txt") == load_text("my.txt")


def test_hf_rows_without_text_are_skipped(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": ["a " * 5, None, "b " * 5]}).to_parquet(str(folder / "train.parquet"))
    assert load_text(f"hf:{folder}:train") == "a a a a a \n\nb b b b b "
    datasets.Dataset.from_dict({"text": [None, None]}).to_parquet(str(folder / "train.parquet"))
    with pytest.raises(DataError, match="has no text in its 'text' column"):
        load_text(f"hf:{folder}:train")


def test_a_dataset_saved_to_disk_is_read_by_its_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"train": {"text": ["calibration text"]}, "test": {"text": ["held-out", "text"]}}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in rows.items()})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_text(f"hf:{tmp_path / 'dd'}:test") == "held-out\n\ntext"
    with pytest.raises(DataError, match=r"has no split 'valid' \(it has: train, test\)"):
        load_text(f"hf:{tmp_path / 'dd'}:valid")
    dd["train"].save_to_disk(str(tmp_path / "one"))  # a single Dataset: its own split
    assert load_text(f"hf:{tmp_path / 'one'}:train") == "calibration text"
    datasets.Dataset.from_dict(rows["test"]).save_to_disk(str(tmp_path / "unnamed"))  # saved without a split
    assert load_text(f"hf:{tmp_path / 'unnamed'}:train") == "held-out\n\ntext"
    with pytest.raises(DataError, match=r"holds one dataset .*split 'train': name it hf:.*one:train"):
        load_text(f"hf:{tmp_path / 'one'}:test")


def test_a_jsonl_file_is_read_by_its_text_fields(tmp_path):
    f = tmp_path / "corpus.jsonl"
    f.write_text('{"text": "caf\\u00e9 \\"quoted\\""}\n\n{"text": "second", "id": 2}\n')
    assert load_text(str(f)) == 'café "quoted"\n\nsecond'
    for body, message in (('{"text": "a"}\nnot json\n', "line 2 is not JSON"),
                          ('{"body": "a"}\n', 'line 1 has no "text"'), ("\n\n", "holds no JSON lines")):
        f.write_text(body)
        with pytest.raises(DataError, match=message):
            load_text(str(f))


def test_a_long_text_is_tokenized_in_pieces_to_the_same_tokens(tok, monkeypatch):
    from analysis import data

    lines = load_text("default").splitlines()  # its lines end with a space: a cut there would change tokens
    assert len(data._pieces("\n".join(lines), 10_000)) == 1
    monkeypatch.setattr(data, "TOKENIZE_CHARS", 10_000)
    # lines without that space, and lines that start with one (as WikiText's do)
    for text in ("\n".join(line.rstrip() for line in lines), "\n".join(" " + line for line in lines)):
        pieces = data._pieces(text, 10_000)
        assert len(pieces) > 20 and "".join(pieces) == text and all(p.endswith("\n") for p in pieces[:-1])
        monkeypatch.setattr(data, "_TOKEN_CACHE", {})
        assert tokenize(tok, text).tolist() == tok(text, add_special_tokens=False, verbose=False)["input_ids"]


def test_text_source_problems_are_found_without_reading(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("hello world\n")
    for ok in ("default", str(f), "hf:wikitext:wikitext-2-raw-v1:test", "hf:ptb_text_only:test"):
        assert text_source_problem(ok) is None, ok
    # WikiText-2 is a local file: fine where it is, a pointed message where it is not
    problem = text_source_problem("wikitext2:test")
    assert problem is None or ("not found" in problem and "ALPHASCOPE_WIKITEXT" in problem)
    assert "does not exist" in text_source_problem(str(tmp_path / "missing.txt"))
    assert "hf:<dataset>" in text_source_problem("hf:onlyname")
    assert "No text source" in text_source_problem("  ")


def test_saved_uploads_are_named_by_content(tmp_path):
    a = save_text("../My notes?.txt", b"some text", tmp_path)
    assert a.parent == tmp_path and a.name.endswith("-My_notes_.txt") and a.read_bytes() == b"some text"
    assert save_text("other.txt", b"some text", tmp_path).read_bytes() == b"some text"
    assert save_text("My notes?.txt", b"some text", tmp_path) == a
    assert save_text("My notes?.txt", b"new text", tmp_path) != a


def test_held_out_split_names_the_validation_split_of_a_test_source(tmp_path, monkeypatch):
    """What an allocation search is offered to score on: the valid split beside a test split, only when
    one exists (WikiText-2, sibling files) or by the hub's convention (hf:); nothing for other sources."""
    folder = tmp_path / "wikitext"
    folder.mkdir()
    monkeypatch.setenv("ALPHASCOPE_WIKITEXT", str(folder))
    assert held_out_split("wikitext2:test") is None  # no valid.txt there
    (folder / "valid.txt").write_text("held out")
    assert held_out_split(" wikitext2:test ") == "wikitext2:valid"
    assert held_out_split("wikitext2:valid") is None and held_out_split("wikitext2:train") is None
    assert held_out_split("hf:wikitext:wikitext-2-raw-v1:test") == "hf:wikitext:wikitext-2-raw-v1:validation"
    assert held_out_split("hf:ptb_text_only:test") == "hf:ptb_text_only:validation"
    assert held_out_split("hf:c4:en:train") is None and held_out_split("hf:test") is None
    for name in ("test.txt", "news-test.txt", "news_test.txt", "contest.txt"):
        (tmp_path / name).write_text("x")
    assert held_out_split(str(tmp_path / "test.txt")) is None  # no sibling yet
    (tmp_path / "dev.txt").write_text("x")
    (tmp_path / "news-validation.txt").write_text("x")
    (tmp_path / "news_val.txt").write_text("x")
    (tmp_path / "conval.txt").write_text("x")
    assert held_out_split(str(tmp_path / "test.txt")) == str(tmp_path / "dev.txt")
    (tmp_path / "valid.txt").write_text("x")  # valid comes before dev
    assert held_out_split(str(tmp_path / "test.txt")) == str(tmp_path / "valid.txt")
    assert held_out_split(str(tmp_path / "news-test.txt")) == str(tmp_path / "news-validation.txt")
    assert held_out_split(str(tmp_path / "news_test.txt")) == str(tmp_path / "news_val.txt")
    assert held_out_split(str(tmp_path / "contest.txt")) is None  # "test" inside a word is not a split
    assert held_out_split("default") is None and held_out_split("") is None


def test_a_tokenizer_that_reads_nothing_is_named_not_a_short_text():
    """A tokenizer that turns a non-empty text into no tokens (not this model's, or one that drops what it
    does not know) gets its own message, attributed to the text source, not "0 tokens, use a longer text"."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from analysis.loading import ModelPreview
    from analysis.settings import CalibrationSettings, EvaluationSettings, SettingsError

    t = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    t.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")  # everything dropped
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    blind = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")
    text = "plenty of words here " * 100
    for make in (lambda: calibration_batches(blind, text, 2, 8), lambda: eval_windows(blind, text, 8)):
        with pytest.raises(DataError, match="into no tokens"):
            make()
    preview = ModelPreview("tiny", blind, None, False, False)
    with pytest.raises(SettingsError, match="into no tokens") as e:
        CalibrationSettings("default", 2, 8).check_model(preview)
    assert e.value.field == "calibration.source"
    with pytest.raises(SettingsError, match="into no tokens") as e:
        EvaluationSettings("default", 8).check_model(preview)
    assert e.value.field == "evaluation.source"
