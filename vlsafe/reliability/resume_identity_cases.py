"""Trust case for the resumable offline tools (issue 16, case 14): a resume must continue with the *same* model.

tools/blind_generate.py and tools/precompute_reference.py share `vlsafe.methods.preference.blind.run_chunked`. A run stopped
after its first shard, then continued after the model file behind the same path was replaced, used to keep
the old model's shards and generate the rest with the new one, without a word. The case runs the shared
runner on a stand-in weights file; `tests/methods/preference/test_blind_and_reference_tools.py` pins the real tools.
"""
from __future__ import annotations

from vlsafe.data.shards import write_shards
from vlsafe.methods.preference.blind import ChunkResult, run_chunked
from vlsafe.reliability.bad_inputs import REJECTED, Bench, Case, WrongResult, qa


def _replaced_model(bench: Bench) -> str:
    folder = bench.folder("resume")
    write_shards([qa(f"q{i}", [], question=f"Question {i}?") for i in range(6)], folder / "in")
    model = folder / "model.safetensors"
    model.write_bytes(bytes(range(256)) * 4096)  # 1 MiB of "weights"

    def process(items):
        return ChunkResult([sample for _, sample in items])

    def run(stop_after=None):
        return run_chunked(folder / "in", folder / "out", process, chunk_size=2, stop_after=stop_after,
                           progress=False, model_path=model)

    run(stop_after=1)
    model.write_bytes(bytes(reversed(range(256))) * 4096)  # another model, same size, same path
    summary = run()
    raise WrongResult(f"resumed with another model: kept {summary.resumed_chunks} chunk(s) of the old one")


def resume_identity_cases() -> list[Case]:
    return [Case("tools", "blind_generate / precompute_reference resumed after the model file was replaced",
                 REJECTED, ("model.safetensors changed since this run started", "start over"), _replaced_model)]
