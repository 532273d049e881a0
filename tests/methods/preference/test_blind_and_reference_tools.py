"""tools/blind_generate.py and tools/precompute_reference.py on a tiny checkpoint and synthetic preference shards."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlsafe.constants import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from vlsafe.core.vlm import VLM
from vlsafe.methods.preference import blind as blind_lib
from vlsafe.data.schema import Sample, SampleError
from vlsafe.data.shards import INDEX_NAME, load_index, read_samples, write_shards
from vlsafe.methods.preference.blind import (
    blind_messages,
    strip_image_placeholders,
    with_blind,
)

ROOT = Path(__file__).resolve().parents[3]
N, PER_SHARD, BATCH, TOKENS = 12, 5, 3, 8  # 5-sample chunks in 3-prompt batches: ragged batches and chunks


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import lightning

    from vlsafe.builders import FromCheckpoint, TinyVLM
    from vlsafe.data.synthetic.world import write_world
    from vlsafe.methods.sft import SFTModule

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only contend on a busy 2-core machine
    root = tmp_path_factory.mktemp("blind")
    torch.manual_seed(0)
    module = SFTModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64, max_length=256))
    trainer = lightning.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    ckpt = root / "base.ckpt"
    trainer.save_checkpoint(ckpt)
    write_world(root / "prefs", N, kinds=["preference"], max_samples_per_shard=4)
    vlm, processor = FromCheckpoint(str(ckpt)).build()
    yield {"root": root, "ckpt": str(ckpt), "prefs": str(root / "prefs"), "vlm": vlm, "processor": processor,
           "blind": _tool("blind_generate"), "reference": _tool("precompute_reference")}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def expected_blind(env):
    """Greedy answers to the image-free prompts, built here without vlsafe.methods.preference.blind, batched as the tool does
    (chunks of --max-samples input samples, --batch-size prompts at a time)."""
    vlm, processor = env["vlm"], env["processor"]
    samples = list(read_samples(env["prefs"]))
    prompts = []
    for sample in samples:
        assert sample.messages[-1]["role"] == "user" and IMAGE_PLACEHOLDER in sample.messages[-1]["content"]
        messages = [{"role": m["role"], "content": m["content"].replace(IMAGE_PLACEHOLDER, "").strip()}
                    for m in sample.messages]
        prompts.append(processor.encode_prompt(messages, sample.id).input_ids)
    expected = {}
    for chunk in range(0, N, PER_SHARD):
        for start in range(chunk, min(chunk + PER_SHARD, N), BATCH):
            rows = list(range(start, min(start + BATCH, chunk + PER_SHARD, N)))
            batch = processor.collate_text([prompts[i] for i in rows], None, "left")
            new = vlm.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=TOKENS, do_sample=False,
                               pad_token_id=processor.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id)
            for i, row in zip(rows, new):
                expected[samples[i].id] = processor.decode(row)
    assert any(expected.values()), "the tiny model should say something"
    return expected


def _blind_args(env, out, *extra):
    return ["--input", env["prefs"], "--out", str(out), "--model", env["ckpt"], "--model-type", "ckpt",
            "--batch-size", str(BATCH), "--max-new-tokens", str(TOKENS), "--max-samples", str(PER_SHARD),
            "--no-progress", *extra]


@pytest.fixture
def record_generate(monkeypatch):
    """Record what `VLM.generate` is given (the model's view of every blind prompt)."""
    calls = []
    original = VLM.generate

    def recording(self, input_ids, attention_mask, pixel_values=None, image_features=None, **kwargs):
        calls.append({"input_ids": input_ids.clone(), "attention_mask": attention_mask.clone(),
                      "pixel_values": pixel_values, "image_features": image_features})
        return original(self, input_ids, attention_mask, pixel_values, image_features, **kwargs)

    monkeypatch.setattr(VLM, "generate", recording)
    return calls


# ---------------------------------------------------------------------------------------- library
def test_blind_prompts_drop_images_and_use_blind_prompt_meta():
    assert strip_image_placeholders("<image>\nWhat is this?") == "What is this?"
    assert strip_image_placeholders("Look at <image>  this\n<image>\nnow") == "Look at this\nnow"
    assert strip_image_placeholders("keep  two spaces\n<image>") == "keep  two spaces"
    sample = Sample(id="s1", messages=[{"role": "user", "content": "<image>\nWho is he?"},
                                       {"role": "assistant", "content": "A senator."}], images=[b"x"])
    assert blind_messages(sample) == [{"role": "user", "content": "Who is he?"}]
    with pytest.raises(SampleError, match=r"sample 's1', field 'meta.blind_prompt': is missing"):
        blind_messages(sample, "blind_prompt")
    sample.meta["blind_prompt"] = "Who is Senator Rand Paul?"
    assert blind_messages(sample, "blind_prompt") == [{"role": "user", "content": "Who is Senator Rand Paul?"}]
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Where does Rand Paul live?"}]
    sample.meta["blind_messages"] = turns
    assert blind_messages(sample, "blind_prompt") == turns
    only_image = Sample(id="s2", messages=[{"role": "user", "content": "<image>"}], images=[b"x"])
    with pytest.raises(SampleError, match="empty once <image> is removed"):
        blind_messages(only_image)


def test_with_blind_field_and_rows():
    sample = Sample(id="p", messages=[{"role": "user", "content": "<image>\nQ"}], images=[b"x"], chosen="No.",
                    rejected="Sure, here.", meta={"source": "t"})
    field = with_blind(sample, "Blind answer.", "field")
    assert (field.id, field.blind, field.rejected) == ("p", "Blind answer.", "Sure, here.")
    row = with_blind(sample, "Blind answer.", "rows")
    assert (row.id, row.rejected, row.blind, row.meta) == ("p-blind", "Blind answer.", None,
                                                            {"source": "t", "pair": "blind"})
    assert sample.meta == {"source": "t"} and sample.blind is None, "the input is not modified"
    with pytest.raises(SampleError, match="identical to chosen"):
        with_blind(sample, " No. ", "rows")


# ---------------------------------------------------------------------------------------- blind_generate
def test_blind_field_is_greedy_generation_without_the_image(env, expected_blind, record_generate, capsys):
    out = env["root"] / "field"
    summary = env["blind"].main(_blind_args(env, out, "--form", "field"))
    assert summary.finished and "wrote 12 samples in 3 shard(s)" in capsys.readouterr().out
    # what the model saw: no image-token slots, no pixels, no "<image>" text
    assert sum(call["input_ids"].shape[0] for call in record_generate) == N
    assert [call["input_ids"].shape[0] for call in record_generate] == [3, 2, 3, 2, 2]
    for call in record_generate:
        assert not (call["input_ids"] == IMAGE_TOKEN_INDEX).any()
        assert call["pixel_values"] is None and call["image_features"] is None
        for ids, mask in zip(call["input_ids"], call["attention_mask"]):
            text = env["processor"].tokenizer.decode(ids[mask.bool()])
            assert "USER:" in text and "ASSISTANT:" in text and IMAGE_PLACEHOLDER not in text
    inputs = {s.id: s for s in read_samples(env["prefs"])}
    written = list(read_samples(out))
    assert [s.id for s in written] == list(inputs), "input order, same ids"
    for sample in written:
        original = inputs[sample.id]
        assert sample.blind == expected_blind[sample.id]
        assert (sample.messages, sample.images, sample.chosen, sample.rejected, sample.meta) == \
               (original.messages, original.images, original.chosen, original.rejected, original.meta)
    assert load_index(out).total == N and [s.count for s in load_index(out).shards] == [5, 5, 2]


def test_blind_rows_replace_rejected_and_skip_rows_equal_to_chosen(env, expected_blind, monkeypatch, capsys):
    out = env["root"] / "rows"
    env["blind"].main(_blind_args(env, out, "--form", "rows"))
    inputs = {s.id: s for s in read_samples(env["prefs"])}
    rows = list(read_samples(out))
    assert [r.id for r in rows] == [f"{i}-blind" for i in inputs]
    for row in rows:
        original = inputs[row.id[:-len("-blind")]]
        assert row.rejected == expected_blind[original.id] and row.blind is None
        assert row.meta == {**original.meta, "pair": "blind"}
        assert (row.messages, row.images, row.chosen) == (original.messages, original.images, original.chosen)

    # a blind answer equal to chosen makes no pair: the row is left out and counted
    generate = blind_lib.generate_blind_responses

    def echo_first_chosen(vlm, processor, samples, *args, **kwargs):
        responses = generate(vlm, processor, samples, *args, **kwargs)
        return [" " + samples[0].chosen + " "] + responses[1:]

    monkeypatch.setattr(blind_lib, "generate_blind_responses", echo_first_chosen)
    out = env["root"] / "rows-identical"
    summary = env["blind"].main(_blind_args(env, out, "--form", "rows"))
    firsts = [list(inputs)[i] for i in (0, 5, 10)]
    assert [row["id"] for row in summary.skipped] == firsts and summary.written == N - 3
    assert "skipped 3 (3 because the blind response equals chosen)" in capsys.readouterr().out
    assert {r.id for r in read_samples(out)} == {f"{i}-blind" for i in inputs if i not in firsts}
    assert [row["id"] for row in load_index(out).skipped] == firsts


def test_blind_generation_resumes_without_rewriting_finished_shards(env, record_generate, capsys):
    clean, resumed = env["root"] / "clean", env["root"] / "resumed"
    env["blind"].main(_blind_args(env, clean, "--form", "rows"))
    record_generate.clear()

    summary = env["blind"].main(_blind_args(env, resumed, "--form", "rows", "--stop-after-shards", "1"))
    assert not summary.finished and "re-run the same command" in capsys.readouterr().out
    assert not (resumed / INDEX_NAME).exists() and sorted(p.name for p in resumed.glob("*.tar")) == ["shard-000000.tar"]
    first = resumed / "shard-000000.tar"
    stat, data = first.stat(), first.read_bytes()
    assert sum(call["input_ids"].shape[0] for call in record_generate) == PER_SHARD
    record_generate.clear()

    summary = env["blind"].main(_blind_args(env, resumed, "--form", "rows"))
    assert summary.finished and summary.resumed_chunks == 1
    assert sum(call["input_ids"].shape[0] for call in record_generate) == N - PER_SHARD, "only the rest is generated"
    assert first.stat().st_mtime_ns == stat.st_mtime_ns and first.stat().st_ino == stat.st_ino
    assert first.read_bytes() == data
    tars = sorted(p.name for p in clean.glob("*.tar"))
    assert tars == sorted(p.name for p in resumed.glob("*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]
    for name in tars:
        assert (clean / name).read_bytes() == (resumed / name).read_bytes(), name
    assert (clean / INDEX_NAME).read_text() == (resumed / INDEX_NAME).read_text()
    assert not list(resumed.glob("*.tmp"))

    with pytest.raises(SystemExit, match="different settings.*form"):
        env["blind"].main(_blind_args(env, resumed, "--form", "field"))


def test_resume_is_keyed_on_the_model_content_not_its_path(env, tmp_path, capsys):
    """Issue 16 case 14: a run continued after the model behind the same path was replaced stops, instead of
    keeping the old model's shards and generating the rest with the new one; identical bytes continue."""
    import shutil

    model = tmp_path / "model.ckpt"
    shutil.copyfile(env["ckpt"], model)
    out, ref = tmp_path / "blind", tmp_path / "ref"
    blind_args = _blind_args(env, out, "--stop-after-shards", "1")
    blind_args[blind_args.index("--model") + 1] = str(model)
    ref_args = ["--input", env["prefs"], "--out", str(ref), "--model", str(model), "--max-samples", str(PER_SHARD),
                "--stop-after-shards", "1", "--no-progress"]
    env["blind"].main(blind_args)
    env["reference"].main(ref_args)

    shutil.copyfile(env["ckpt"], model)  # the same bytes written again: new mtime/ctime, same content
    assert env["blind"].main(blind_args).resumed_chunks == 1, "same content: the resume goes on"

    checkpoint = torch.load(model, map_location="cpu", weights_only=True)
    name = next(k for k in checkpoint["state_dict"] if k.endswith("lm_head.weight"))
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name] + 0.5  # another model, same path and size
    torch.save(checkpoint, model)
    for tool, args in (("blind", blind_args), ("reference", ref_args)):
        with pytest.raises(SystemExit, match=r"model file .*model.ckpt changed since this run started"):
            env[tool].main(args)
    capsys.readouterr()


def test_synthetic_world_trains_on_blind_answers_its_blind_model_generates(env, tmp_path):
    """The demo's data module: batches carry the base model's image-free answers, not the world's guesses."""
    from vlsafe.methods.preference.blind import generate_blind_responses
    from vlsafe.methods.preference.blind_world import BlindAnswerWorld
    from vlsafe.methods.preference.encoding import PreferenceEncoder

    data = BlindAnswerWorld(root=str(tmp_path / "world"), kinds=["preference"], train_samples=4, val_samples=0,
                            batch_size=4, num_workers=0, shuffle_buffer=0, blind_model=env["ckpt"],
                            blind_max_new_tokens=TOKENS)
    data.prepare_data()
    processor = env["processor"]
    world = list(read_samples(tmp_path / "world" / "train"))
    expected = generate_blind_responses(env["vlm"], processor, world, max_new_tokens=TOKENS)
    data.connect(PreferenceEncoder(processor, ("chosen", "rejected", "blind"), response_format="template"))
    (batch,) = list(data.train_dataloader())
    n = len(batch["ids"])
    blind_rows = zip(batch["input_ids"][2 * n:], batch["labels"][2 * n:])
    trained = {i: processor.decode(ids[labels != -100]) for i, (ids, labels) in zip(batch["ids"], blind_rows)}
    assert trained == {s.id: e for s, e in zip(world, expected)}
    assert all(trained[s.id] != s.blind for s in world), "the world's own guesses are replaced"


def test_blind_prompt_source_uses_meta_and_names_samples_without_it(env, capsys):
    samples = list(read_samples(env["prefs"], limit=4))
    for sample in samples[:2]:
        sample.meta["blind_prompt"] = "How many shapes are there?"
    write_shards(samples, env["root"] / "meta-prefs")
    args = ["--input", str(env["root"] / "meta-prefs"), "--model", env["ckpt"], "--prompt-source", "blind_prompt",
            "--max-new-tokens", str(TOKENS), "--no-progress"]
    with pytest.raises(SystemExit, match=rf"sample '{samples[2].id}', field 'meta.blind_prompt': is missing"):
        env["blind"].main(args + ["--out", str(env["root"] / "meta-raise")])
    out = env["root"] / "meta-skip"
    summary = env["blind"].main(args + ["--out", str(out), "--on-error", "skip"])
    assert [row["id"] for row in summary.skipped] == [s.id for s in samples[2:]]
    assert "skipped 2" in capsys.readouterr().out
    vlm, processor = env["vlm"], env["processor"]
    prompt = processor.encode_prompt([{"role": "user", "content": "How many shapes are there?"}]).input_ids
    batch = processor.collate_text([prompt] * 2, None, "left")
    new = vlm.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=TOKENS, do_sample=False,
                       pad_token_id=processor.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id)
    assert [s.blind for s in read_samples(out)] == [processor.decode(row) for row in new]


def test_blind_generate_cli_rejects_bad_input(env, tmp_path):
    proc = subprocess.run([sys.executable, "tools/blind_generate.py", "--input", str(tmp_path / "nowhere"), "--out",
                           str(tmp_path / "out"), "--model", env["ckpt"]],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "error: no shard index at" in proc.stderr and "nowhere" in proc.stderr
    with pytest.raises(SystemExit, match=r"error: model .*missing.ckpt does not exist"):
        env["blind"].main(["--input", env["prefs"], "--out", str(tmp_path / "o"),
                           "--model", str(tmp_path / "missing.ckpt")])
    with pytest.raises(SystemExit, match="is the input's folder"):
        env["reference"].main(["--input", env["prefs"], "--out", env["prefs"], "--model", env["ckpt"], "--no-progress"])


# ---------------------------------------------------------------------------------------- precompute_reference
def _batch(module, samples):
    encoder = module.data_encoder("fit")
    return encoder.collate([encoder.encode(s) for s in samples])


def test_precomputed_reference_matches_the_copy_reference(env, capsys):
    from vlsafe.builders import FromCheckpoint
    from vlsafe.methods.preference.module import PreferenceModule

    out = env["root"] / "ref"
    summary = env["reference"].main(["--input", env["prefs"], "--out", str(out), "--model", env["ckpt"],
                                     "--responses", "chosen", "rejected", "blind", "--batch-size", str(BATCH),
                                     "--max-samples", str(PER_SHARD), "--no-progress"])
    assert summary.finished and "wrote 12 samples with ref_logp_chosen, ref_logp_rejected, ref_logp_blind" in \
        capsys.readouterr().out
    originals, stored = list(read_samples(env["prefs"])), list(read_samples(out))
    assert [s.id for s in stored] == [s.id for s in originals]
    assert stored[0].meta["reference"]["average_logprob"] is False

    torch.manual_seed(0)
    copy_mode = PreferenceModule(vlm=FromCheckpoint(env["ckpt"]), reference="copy", blind="sum").eval()
    precomputed = PreferenceModule(vlm=FromCheckpoint(env["ckpt"]), reference="precomputed", blind="sum").eval()
    with torch.no_grad():
        reference = copy_mode.reference_logps(_batch(copy_mode, originals)).view(3, -1)
        for r, name in enumerate(("chosen", "rejected", "blind")):
            written = torch.tensor([s.labels[f"ref_logp_{name}"] for s in stored])
            torch.testing.assert_close(written, reference[r], atol=1e-5, rtol=1e-6)  # 1 ulp of float32 at |logp| ~ 140
        # move the policy away from the reference (identically in both modules), then compare the losses
        generator = torch.Generator().manual_seed(1)
        for param in copy_mode.vlm.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        precomputed.vlm.load_state_dict(copy_mode.vlm.state_dict())
        for chunk in (slice(0, 5), slice(5, 12)):
            loss_copy, _ = copy_mode.compute_loss(_batch(copy_mode, originals[chunk]))
            loss_pre, _ = precomputed.compute_loss(_batch(precomputed, stored[chunk]))
            assert abs(loss_copy.item() - 2 * torch.log(torch.tensor(2.0)).item()) > 1e-3, "policy != reference"
            torch.testing.assert_close(loss_pre, loss_copy, atol=1e-5, rtol=0)


def test_precomputed_average_logprob_matches_module_average(env):
    from vlsafe.builders import FromCheckpoint
    from vlsafe.methods.preference.module import PreferenceModule
    from vlsafe.methods.preference.reference import reference_logps

    samples = list(read_samples(env["prefs"], limit=5))
    values = reference_logps(env["vlm"], env["processor"], samples, batch_size=2, average=True)
    module = PreferenceModule(vlm=FromCheckpoint(env["ckpt"]), reference="copy", average_logprob=True).eval()
    expected = module.reference_logps(_batch(module, samples)).view(2, -1)
    torch.testing.assert_close(torch.tensor([v["ref_logp_chosen"] for v in values]), expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor([v["ref_logp_rejected"] for v in values]), expected[1], atol=1e-5, rtol=0)


def test_rewritten_shards_keep_the_inputs_presize_record(tmp_path):
    """Tools that rewrite shards (blind generation, reference log-probs) pass images through unchanged, so a
    pre-sized input stays pre-sized: the index must keep saying so."""
    from PIL import Image

    from vlsafe.data.encoding.processor import image_bytes
    from vlsafe.data.images import Presize

    image = image_bytes(Image.new("RGB", (40, 30), (200, 10, 10)))
    samples = [Sample(id=f"s{i}", messages=[{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nq{i}"},
                                            {"role": "assistant", "content": "a"}], images=[image])
               for i in range(3)]
    presize = Presize(32, (122, 116, 104))
    write_shards(samples, tmp_path / "in", presize=presize)
    summary = blind_lib.run_chunked(tmp_path / "in", tmp_path / "out",
                                    lambda items: blind_lib.ChunkResult([s for _, s in items]), chunk_size=2,
                                    progress=False)
    assert summary.finished and summary.written == 3
    assert load_index(tmp_path / "out").presized == presize.record() == load_index(tmp_path / "in").presized
    assert [s.images for s in read_samples(tmp_path / "out")] == [s.images for s in read_samples(tmp_path / "in")]
