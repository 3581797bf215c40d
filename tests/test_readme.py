"""The READMEs' Python examples run as written (offline ones; examples that need downloaded weights are
recognised by a hub id in quotes and are checked only for syntax), and their results are checked by value: the
random inputs an example draws are recorded, and its outputs are compared with what the same objects compute."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
DATA_README = README.parent / "data_pipelines" / "README.md"
DATA_BLOCKS = re.findall(r"```python\n(.*?)```", DATA_README.read_text(), flags=re.S)
NEEDS_DOWNLOAD = re.compile(r"\"(deepmind|anas-awadalla|openai)[/\"]")


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


def _run(code: str, monkeypatch) -> tuple[dict, list[torch.Tensor]]:
    """Execute an example; returns its namespace and every tensor it drew with torch.randn / torch.randint."""
    drawn: list[torch.Tensor] = []
    for name in ("randn", "randint"):
        real = getattr(torch, name)

        def recording(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            drawn.append(out)
            return out

        monkeypatch.setattr(torch, name, recording)
    namespace: dict = {}
    exec(compile(code, "README.md example", "exec"), namespace)
    monkeypatch.undo()
    return namespace, drawn


def _drawn(drawn: list[torch.Tensor], shape: tuple[int, ...]) -> list[torch.Tensor]:
    return [t for t in drawn if tuple(t.shape) == shape]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example(index, monkeypatch):
    code = BLOCKS[index]
    compile(code, f"README.md example {index}", "exec")
    if NEEDS_DOWNLOAD.search(code):
        return  # needs a model hub: syntax only
    torch.manual_seed(0)
    ns, drawn = _run(code, monkeypatch)
    with torch.no_grad():
        if "logits" in ns and "model" in ns:  # Perceiver classifier
            (x,) = _drawn(drawn, (8, 32, 32, 3))
            logits = ns["logits"]
            assert logits.shape == (8, 10) and torch.isfinite(logits).all()
            # the printed logits are the model's function of the drawn images, row by row
            torch.testing.assert_close(ns["model"](x[3:5]), logits[3:5], rtol=1e-4, atol=1e-5)
            assert (logits[0] - logits[1]).abs().max() > 1e-6  # different images, different logits
        if "dense" in ns:  # Perceiver IO
            x_dense, x_some = _drawn(drawn, (2, 32, 32, 3))
            assert tuple(ns["dense"].shape) == (2, 1024, 2) and tuple(ns["some"].shape) == (2, 10, 2)
            model = ns["model"]
            torch.testing.assert_close(model(x_dense), ns["dense"])
            # decoding only the requested points gives exactly those rows of the dense output
            torch.testing.assert_close(ns["some"], model(x_some)[:, :10], rtol=1e-4, atol=1e-5)
        if "out" in ns and "ar" in ns:  # Perceiver AR: the prompt followed by 20 sampled tokens
            (prompt,) = _drawn(drawn, (2, 300))
            out = ns["out"]
            assert tuple(out.shape) == (2, 320) and torch.equal(out[:, :300], prompt)
            assert out.dtype == torch.long and 0 <= int(out.min()) and int(out.max()) < 256
            greedy = ns["ar"].generate(prompt, max_new_tokens=20, temperature=0.0)
            assert torch.equal(greedy, ns["ar"].generate(prompt, max_new_tokens=20, temperature=0.0, use_cache=False))
            logits = ns["ar"](prompt, num_latents=1)  # the first greedy token: argmax after the prompt (1 latent)
            assert torch.equal(greedy[:, 300], logits[:, -1].argmax(-1))
        if "tokenizer" in ns and "image_processor" in ns:  # Flamingo on the offline pretrained bases
            model, tokenizer = ns["model"], ns["tokenizer"]
            assert model.config.lang_encoder_path == "smollm2-135m" and len(tokenizer) == 49152 + 3
            assert model.vision_encoder.num_channels == 1280 and len(model.gated_cross_attn_layers) == 6
            ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
            vision_x = torch.zeros(1, 1, 1, 3, 224, 224)
            next_token = model(vision_x, ids).logits[0, -1].argmax()  # gates at 0: the pretrained LM's own answer
            assert tokenizer.decode(next_token) == " Paris"


def test_data_pipelines_readme_example(tmp_path, monkeypatch):
    """data_pipelines/README.md's example runs as written, in an empty directory (where it generates its data), and
    its objects hold what it says: batches of the generated pairs in the Flamingo format, a saved position that a
    new loader continues exactly (in-process, after two workers), and a mix of both sources."""
    import dataclasses

    from data_pipelines import ShardLoader, pairs_loader

    code, binding = DATA_BLOCKS
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "data_pipelines/README.md example", "exec"), ns)
    exec(compile(binding, "data_pipelines/README.md binding example", "exec"), ns)
    episodes = ns["episode_batch"]
    assert episodes["vision_x"].shape[:2] == (4, 10)
    for row, meta in enumerate(episodes["metadata"]):
        assert 2 <= len(meta["words"]) <= 4 and set(meta["words"]) <= set(ns["pool"].train)
        assert int(episodes["media_mask"][row].sum()) == len(meta["sample_ids"])
    assert not set(ns["pool"].train) & set(ns["pool"].eval)
    tokenizer, loader, batch = ns["tokenizer"], ns["loader"], ns["batch"]
    assert tuple(batch["vision_x"].shape) == (32, 1, 1, 3, 32, 32) and batch["media_mask"].all()
    assert loader.stats == {"samples": 96, "batches": 3, "skipped": 0}
    assert ns["checkpoint"]["data"]["position"] == 96 and ns["resumed"].position == 96

    # the same stream read uninterrupted: its third batch is the example's last, its fourth the resumed one's first
    fresh = pairs_loader(ns["data"].pairs, tokenizer, ns["transform"], return_metadata=True, **ns["options"])
    batches = [b for _, b in zip(range(4), fresh)]
    resumed = next(iter(ns["resumed"]))
    for key in ("vision_x", "input_ids", "attention_mask", "labels"):
        assert torch.equal(batches[2][key], batch[key]) and torch.equal(batches[3][key], resumed[key]), key
    assert not torch.equal(batches[3]["input_ids"], batch["input_ids"])
    # each row is <image>caption<|endofchunk|></s> of the sample it names, the caption in the loss
    for row in range(4):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        caption = batches[2]["metadata"][row]["json"]["caption"]
        assert tokenizer.decode(ids) == f"<image> {caption}<|endofchunk|></s>"
        labels = batch["labels"][row]
        assert tokenizer.decode(labels[labels != -100]).strip().startswith(caption)

    mixed = ns["mixed"]
    assert mixed.num_samples == {"shapes": 2000, "more-shapes": 500}
    first = next(iter(ShardLoader(dataclasses.replace(mixed.config, return_metadata=True), tokenizer, ns["transform"])))
    sources = [m["source"] for m in first["metadata"]]
    assert len(sources) == 32 and set(sources) == {"shapes", "more-shapes"}
    assert sources.count("shapes") > sources.count("more-shapes")  # weights 2 : 1
