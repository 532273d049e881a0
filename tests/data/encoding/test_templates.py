"""Conversation templates and label masking, checked on exact strings and exact token ids."""
import pytest
import torch

from vlsafe.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlsafe.data.encoding.processor import VLMProcessor
from vlsafe.data.encoding.templates import VICUNA_SYSTEM, get_template, move_image_first
from vlsafe.data.schema import SampleError

CONVERSATION = [
    {"role": "user", "content": "<image>\nWhat color is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "Is there a square?"},
    {"role": "assistant", "content": "yes"},
]


def test_vicuna_v1_renders_llava_string_exactly():
    text = get_template("vicuna_v1").prompt_text(CONVERSATION, eos="</s>", add_generation_prompt=False)
    assert text == (VICUNA_SYSTEM + " USER: <image>\nWhat color is the circle? ASSISTANT: red</s>"
                    "USER: Is there a square? ASSISTANT: yes</s>")
    prompt = get_template("vicuna_v1").prompt_text(CONVERSATION[:3], eos="</s>")
    assert prompt.endswith("USER: Is there a square? ASSISTANT:")


def test_llama2_and_plain_render():
    text = get_template("llama2").prompt_text(CONVERSATION, eos="</s>", bos="<s>", add_generation_prompt=False)
    assert text.startswith("[INST] <<SYS>>\n")
    assert "<</SYS>>\n\n<image>\nWhat color is the circle? [/INST] red </s><s>[INST] Is there a square? [/INST] yes </s>" in text
    plain = get_template("plain").prompt_text([{"role": "user", "content": "<image>"},
                                               {"role": "assistant", "content": "a red circle"}],
                                              eos="</s>", add_generation_prompt=False)
    assert plain == "<image>a red circle\n"


def test_alternation_is_enforced():
    with pytest.raises(ValueError, match="turn 1 has role 'user'"):
        get_template("vicuna_v1").prompt_text([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                                              eos="</s>")


def test_labels_supervise_exactly_the_assistant_replies(tokenizer):
    processor = VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=5, max_length=512)
    encoded = processor.encode_conversation(CONVERSATION)
    ids, labels = encoded.input_ids, encoded.labels
    eos = tokenizer.eos_token_id
    reply = lambda text: tokenizer(" " + text, add_special_tokens=False)["input_ids"]  # noqa: E731
    supervised = [label for label in labels if label != IGNORE_INDEX]
    assert supervised == reply("red") + [eos] + reply("yes") + [eos]
    # supervised labels sit exactly on the matching input ids, everything else is ignored
    for token, label in zip(ids, labels):
        assert label in (IGNORE_INDEX, token)
    assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    image_positions = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    assert len(image_positions) == 5 and image_positions == list(range(image_positions[0], image_positions[0] + 5))
    assert all(labels[i] == IGNORE_INDEX for i in image_positions)
    # the text around the image round-trips
    before = tokenizer.decode([t for t in ids[1:image_positions[0]]])
    assert before == VICUNA_SYSTEM + " USER: "


def test_generation_prompt_is_a_prefix_of_training_sequence(tokenizer):
    processor = VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=3)
    prompt = processor.encode_prompt(CONVERSATION[:1]).input_ids
    full = processor.encode_conversation(CONVERSATION[:2]).input_ids
    assert full[:len(prompt)] == prompt, "train/inference tokenisation of the prompt must agree"


def test_two_images_in_one_turn(tokenizer):
    processor = VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=4)
    messages = [{"role": "user", "content": "<image>\n<image>\nSame?"}, {"role": "assistant", "content": "no"}]
    ids = processor.encode_conversation(messages).input_ids
    assert ids.count(IMAGE_TOKEN_INDEX) == 8


def test_truncation_reports_instead_of_silently_dropping(tokenizer):
    processor = VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=4, max_length=20)
    with pytest.raises(SampleError, match=r"sample 'long-1'.*would cut into an image"):
        processor.encode_conversation(CONVERSATION, "long-1")
    text_only = [{"role": "user", "content": "Describe the image. " * 10}, {"role": "assistant", "content": "red"}]
    with pytest.raises(SampleError, match="removes every supervised token"):
        processor.encode_conversation(text_only, "long-2")
    processor.max_length = 400
    assert not processor.encode_conversation(text_only).truncated


def test_empty_answer_and_missing_assistant_are_errors(tokenizer):
    processor = VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=4)
    with pytest.raises(SampleError, match="no assistant turn"):
        processor.encode_conversation([{"role": "user", "content": "hi"}], "s1")
    with pytest.raises(SampleError, match=r"messages\[1\].content"):
        processor.encode_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "s2")


def test_padding_sides(tokenizer):
    processor = VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=2)
    right = processor.collate_text([[5, 6, 7], [8]], [[1, 2, 3], [4]], "right")
    left = processor.collate_text([[5, 6, 7], [8]], None, "left")
    pad = processor.pad_token_id
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert right["labels"].tolist() == [[1, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert left["input_ids"].tolist() == [[5, 6, 7], [pad, pad, 8]]
    assert torch.equal(left["attention_mask"], torch.tensor([[1, 1, 1], [0, 0, 1]]))


def test_image_preprocessing_pads_with_mean_colour(tokenizer):
    from PIL import Image

    processor = VLMProcessor(tokenizer, "vicuna_v1", image_size=64, num_image_tokens=1)
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    pixels = processor.preprocess_image(wide)
    mean = torch.tensor(processor.image_mean).view(3, 1)
    std = torch.tensor(processor.image_std).view(3, 1)
    top_row = pixels[:, 0, :] * std + mean  # padded band: LLaVA's int(mean*255) colour
    assert torch.allclose(top_row, torch.floor(mean * 255).expand_as(top_row) / 255, atol=1e-3)
    centre = pixels[:, 32, 32] * std[:, 0] + mean[:, 0]
    assert torch.allclose(centre, torch.tensor([1.0, 0.0, 0.0]), atol=0.02)


def test_move_image_first():
    assert move_image_first("What is this? <image>") == "<image>\nWhat is this?"
    assert move_image_first("no image") == "no image"


def test_overlong_prompt_is_an_error_not_a_silent_cut(tokenizer):
    processor = VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=4, max_length=30)
    with pytest.raises(SampleError, match="losing the generation prompt"):
        processor.encode_prompt([{"role": "user", "content": "Describe the image. " * 10}], "p1")
