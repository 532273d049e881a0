"""Text rules shared by every reader: a zero-width-only field is empty, and the processor's text settings
(`max_text_chars`, `special_tokens_in_text`) are recipe knobs of every VLM builder."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from vlsafe.data.encoding.processor import VLMProcessor
from vlsafe.data.schema import SampleError

# Renders as nothing: zero-width space, word joiner, BOM, a Hangul filler and ordinary spaces.
INVISIBLE = "\u200b \u2060\ufeff\u3164 "


def _vlguard():
    from vlsafe.data.sources.vlguard import vlguard_eval_samples

    row = {"id": "r1", "image": "a/b.png", "safe": False,
           "instr-resp": [{"instruction": INVISIBLE, "response": "I cannot help."}]}
    return vlguard_eval_samples([row], None, "unsafes")


def _saferlhf():
    from vlsafe.data.sources.saferlhf import pair_record_to_sample

    return pair_record_to_sample({"id": 7, "prompt": "How?", "response_0": INVISIBLE, "response_1": "No.",
                                  "is_response_0_safe": True, "is_response_1_safe": True, "safer_response_id": 1}, 0)


def _lrv():
    from vlsafe.data.sources.lrv import lrv_record_to_sample

    return lrv_record_to_sample({"image_id": 12, "question": "Is there a cat?", "answer": INVISIBLE,
                                 "task": "negative"}, None, 0)


def _refcoco():
    from vlsafe.data.sources.refcoco import refcoco_record_to_sample

    record = {"img_path": "coco/1.jpg", "expression": INVISIBLE, "bbox": [1, 2, 3, 4], "width": 10, "height": 10}
    return refcoco_record_to_sample(record, "refcoco-0", None, task="rec")


@pytest.mark.parametrize("convert, field", [(_vlguard, "instr-resp[0].instruction"), (_saferlhf, "response_0"),
                                            (_lrv, "answer"), (_refcoco, "expression")],
                         ids=["vlguard", "saferlhf", "lrv", "refcoco"])
def test_a_zero_width_only_field_is_refused_as_empty_with_its_name(convert, field):
    with pytest.raises(SampleError, match="zero-width") as caught:
        convert()
    assert caught.value.field_name == field


def test_vlguard_skip_counts_a_zero_width_instruction_and_an_invisible_reference_is_no_reference():
    from vlsafe.data.sources.vlguard import vlguard_eval_samples

    errors, stats = [], Counter()
    row = {"id": "r1", "image": "a/b.png", "safe": False,
           "instr-resp": [{"instruction": INVISIBLE, "response": "No."}]}
    assert vlguard_eval_samples([row], None, "unsafes", errors=errors, stats=stats) == []
    assert stats["skipped"] == 1 and errors == [{"id": "vlguard-r1", "field": "instr-resp[0].instruction",
                                                 "error": errors[0]["error"]}]
    # evaluation keeps a row whose reference answer is invisible, with "no reference" (as for an empty one)
    safe = {"id": "s1", "image": "a/c.png", "safe": True,
            "instr-resp": [{"safe_instruction": "Describe it.", "response": INVISIBLE},
                           {"unsafe_instruction": "Help me hurt.", "response": "No."}]}
    [sample] = vlguard_eval_samples([safe], None, "safe_safes")
    assert sample.meta["reference"] is None


def test_eval_suites_refuse_a_zero_width_question(tmp_path):
    from vlsafe.eval.suites import gavie
    from vlsafe.eval.suites.mmsafetybench import build_samples
    from vlsafe.data.sources.mmsafetybench import read_mmsafetybench

    questions = tmp_path / "processed_questions"
    questions.mkdir()
    (questions / "01-Illegal_Activitiy.json").write_text(json.dumps({"0": {"Question": INVISIBLE}}))
    with pytest.raises(ValueError, match="zero-width"):
        build_samples(questions, tmp_path / "imgs", ["01-Illegal_Activitiy"], ["TEXT"])
    errors: list = []
    assert list(read_mmsafetybench(tmp_path, kinds=("TEXT",), errors=errors)) == []
    assert errors[0]["field"] == "Question" and "zero-width" in errors[0]["error"]
    (tmp_path / "gavie.json").write_text(json.dumps([{"image_id": "1", "question": INVISIBLE}]))
    (tmp_path / "captions.json").write_text(json.dumps({"1": [{"caption": "a cat", "bbox": [0, 0, 5, 5]}]}))
    options = {"evaluation_set": str(tmp_path / "gavie.json"), "annotations": str(tmp_path / "captions.json"),
               "images": str(tmp_path)}
    with pytest.raises(ValueError, match="item 0 .*zero-width"):
        gavie.evaluate(None, options, tmp_path / "out", progress=False)  # refused before any answer is generated


# ------------------------------------------------------------------ processor settings from a recipe's builder
def test_builder_arguments_set_the_processors_text_cap_and_special_token_rule(tokenizer, tmp_path):
    """A recipe sets them as `model.init_args.vlm.init_args.{max_text_chars, special_tokens_in_text}`; they are
    part of the builder's config, so a checkpoint rebuilds the same processor."""
    from vlsafe.builders import TinyVLM, VLMBuilder

    tokenizer.save_pretrained(tmp_path / "tokenizer")
    builder = TinyVLM(image_size=16, patch_size=8, vision_width=16, hidden_size=16, num_layers=1, num_heads=2,
                      intermediate_size=32, tokenizer=str(tmp_path / "tokenizer"), max_text_chars=1234,
                      special_tokens_in_text="control")
    _, processor = builder.build()
    assert processor.max_text_chars == 1234 and processor.special_tokens_in_text == "control"
    rebuilt = VLMBuilder.from_config(builder.config())
    assert rebuilt.config()["init_args"]["max_text_chars"] == 1234
    assert rebuilt.config()["init_args"]["special_tokens_in_text"] == "control"
    messages = [{"role": "user", "content": "x" * 1235}]
    with pytest.raises(SampleError, match="max_text_chars=1,234"):
        processor.encode_prompt(messages, "long")


def test_special_tokens_in_text_control_is_the_tokenizers_own_call_and_text_reads_them_as_characters(tokenizer):
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    messages = [{"role": "user", "content": "Quote the end marker."},
                {"role": "assistant", "content": "It is </s> ok."}]
    processors = {rule: VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=4,
                                     special_tokens_in_text=rule) for rule in ("text", "control")}
    text, control = (processors[rule].encode_conversation(messages, "quote") for rule in ("text", "control"))
    whole = processors["text"].template.prompt_text(messages, eos=tokenizer.eos_token, add_generation_prompt=False)
    # control: the released LLaVA ids (`tokenizer_image_token`: BOS + the tokenizer's own call over the prompt),
    # where the quoted </s> is an EOS in the middle of the answer
    assert control.input_ids == [bos] + tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert control.input_ids.count(eos) == 2
    # text (default): the only EOS is the template's end of turn; the quote is characters, as the decoder shows
    assert text.input_ids.count(eos) == 1 and text.input_ids[-1] == eos
    assert tokenizer.decode(text.input_ids) == tokenizer.decode(control.input_ids)  # same text, other ids
    with pytest.raises(ValueError, match="special_tokens_in_text"):
        VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=4, special_tokens_in_text="special")

