"""`vlsafe export` writes how the model was trained to be prompted: the conversation template as the tokenizer's
and processor's Jinja `chat_template`, the BOS behaviour, LLaVA's pad-to-square image preprocessing and
generation_config.json. Checked through transformers itself: `LlavaProcessor.apply_chat_template` on the exported
folder gives vlsafe's token ids, and `LlavaForConditionalGeneration.generate` vlsafe's greedy tokens."""
from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor
from transformers.utils.chat_template_utils import render_jinja_template

from tests.scale.conftest import export
from vlsafe.constants import IMAGE_TOKEN_INDEX
from vlsafe.data.encoding.jinja import jinja_chat_template
from vlsafe.data.encoding.templates import TEMPLATES

QUESTION = "What shape is in the picture?"


def _noisy_image(size: tuple[int, int] = (90, 52)) -> Image.Image:
    """Wide, with high-frequency content, so padding and resampling differences would show."""
    g = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _conversations(template: str, image: Image.Image) -> list[tuple[str, list[dict], list[dict]]]:
    """(name, vlsafe messages, transformers messages) pairs: one turn, and system prompt + two turns."""
    if template == "plain":  # stage-1 captioning: the user turn is the image alone
        return [("image only", [{"role": "user", "content": "<image>"}],
                 [{"role": "user", "content": [{"type": "image", "image": image}]}])]
    first_ours = {"role": "user", "content": f"<image>\n{QUESTION}"}
    first_theirs = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}
    rest = [{"role": "assistant", "content": "A red square."}, {"role": "user", "content": "And its colour?"}]
    system = {"role": "system", "content": "Answer in three words."}
    return [("one turn", [first_ours], [first_theirs]),
            ("system + two turns", [system, first_ours, *rest], [system, first_theirs, *rest])]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer_dir):
    """One checkpoint per template (what a Trainer saves: state_dict + plain-data hyperparameters), exported."""
    from vlsafe.builders import TinyVLM
    from vlsafe.methods.sft import SFTModule

    folders = {}
    for name in TEMPLATES:
        root = tmp_path_factory.mktemp(f"export_{name}")
        torch.manual_seed(0)
        module = SFTModule(vlm=TinyVLM(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                       max_length=256, tokenizer=tiny_tokenizer_dir, template=name),
                           generation={"max_new_tokens": 10})
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 3,
                    "epoch": 0, "vlsafe_method": "vlsafe.methods.sft.SFTModule"}, root / "model.ckpt")
        assert export([str(root / "model.ckpt"), "--out", str(root / "hf")]) == 0
        folders[name] = (module.eval(), root / "hf")
    return folders


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_chat_template_tokenises_and_generates_like_vlsafe(exported, template):
    module, folder = exported[template]
    ours_processor = module.processor
    theirs_processor = LlavaProcessor.from_pretrained(folder, backend="pil")
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    image = _noisy_image()
    ours_pixels = ours_processor.preprocess_image(_png(image))
    for what, ours_messages, theirs_messages in _conversations(template, image):
        encoded = ours_processor.encode_prompt(ours_messages)
        expected = [theirs_processor.image_token_id if i == IMAGE_TOKEN_INDEX else i for i in encoded.input_ids]
        inputs = theirs_processor.apply_chat_template(theirs_messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == expected, (template, what)
        assert expected[0] == ours_processor.tokenizer.bos_token_id and expected.count(expected[0]) >= 1
        # LLaVA's pad-to-square with the mean colour, then PIL bicubic: the same pixels up to float rounding
        assert (inputs["pixel_values"][0] - ours_pixels).abs().max() < 1e-5, (template, what)

        batch = ours_processor.collate_text([encoded.input_ids], side="left")
        ours_tokens = module.vlm.generate(batch["input_ids"], batch["attention_mask"], ours_pixels[None],
                                          max_new_tokens=10, do_sample=False, pad_token_id=ours_processor.pad_token_id,
                                          eos_token_id=ours_processor.tokenizer.eos_token_id)[0].tolist()
        # generation_config.json supplies max_new_tokens, greedy decoding and the eos/pad ids
        theirs_tokens = model.generate(**inputs)[0, inputs["input_ids"].shape[1]:].tolist()
        assert theirs_tokens == ours_tokens, (template, what)
        assert len(set(ours_tokens)) > 1  # a real continuation, not one repeated id


def test_generation_config_and_bos_come_from_the_checkpoint(exported):
    module, folder = exported["vicuna_v1"]
    config = json.loads((folder / "generation_config.json").read_text())
    tokenizer = module.processor.tokenizer
    assert config["max_new_tokens"] == 10 and config["do_sample"] is False and config["num_beams"] == 1
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (
        tokenizer.eos_token_id, module.processor.pad_token_id, tokenizer.bos_token_id)
    assert "temperature" not in config  # greedy: sampling settings are not written (vlsafe drops them too)
    # the base tokenizer added no BOS on its own; vlsafe trained with one, so the export's tokenizer adds it
    assert tokenizer("a red square").input_ids[0] != tokenizer.bos_token_id
    exported_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert exported_tokenizer("a red square").input_ids[0] == tokenizer.bos_token_id
    # ... and the chat template's own BOS is not doubled by apply_chat_template
    ids = exported_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                 tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids == module.processor.encode_prompt([{"role": "user", "content": "hi"}]).input_ids


def test_special_token_text_matches_only_with_sanitized_control_tokens(exported):
    """vlsafe reads a quoted `</s>` in a message as characters; transformers does with sanitize_control_tokens."""
    module, folder = exported["vicuna_v1"]
    processor = LlavaProcessor.from_pretrained(folder, backend="pil")
    text = "Repeat '</s>' and <s> literally."
    image = _noisy_image((40, 40))
    expected = [processor.image_token_id if i == IMAGE_TOKEN_INDEX else i
                for i in module.processor.encode_prompt([{"role": "user", "content": f"<image>\n{text}"}]).input_ids]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]

    def ids(**kwargs) -> list[int]:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt", **kwargs)["input_ids"][0].tolist()

    assert ids(sanitize_control_tokens=True) == expected
    assert ids() != expected  # transformers' default turns the quoted text into EOS/BOS ids


@pytest.mark.parametrize("prepend_scheme", ["always", "first"])
def test_llama_style_tokenizer_ids_match_unless_it_prefixes_only_the_first_piece(prepend_scheme):
    """A Llama-style ("▁"-prefix, byte-fallback, BOS post-processor) tokenizer: a legacy one ("always", Vicuna's)
    gives vlsafe's ids through the chat template; a "first" one cannot (the word after the BOS and after the image
    tokens loses its "▁"), and the export says so in the card's notes."""
    import copy

    from tokenizers import pre_tokenizers
    from transformers import LlavaImageProcessor

    from tests.test_fidelity_core import sentencepiece_style_tokenizer
    from vlsafe.data.encoding.processor import VLMProcessor
    from vlsafe.export.prompting import prompting

    tokenizer = sentencepiece_style_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                                         prepend_scheme=prepend_scheme)
    ours = VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=4)
    theirs_tokenizer = copy.deepcopy(tokenizer)
    theirs_tokenizer.add_tokens(["<image>"], special_tokens=True)
    setup = prompting(ours, {})
    theirs = LlavaProcessor(image_processor=LlavaImageProcessor(do_pad=True, size={"shortest_edge": 32},
                                                                crop_size={"height": 32, "width": 32}),
                            tokenizer=theirs_tokenizer, patch_size=16, vision_feature_select_strategy="default",
                            num_additional_image_tokens=1, chat_template=setup.chat_template)
    turns = [{"role": "user", "content": [{"type": "image", "image": _noisy_image((40, 30))},
                                          {"type": "text", "text": "What is on the table?"}]},
             {"role": "assistant", "content": "Two cups: one is empty."}, {"role": "user", "content": "Any text?"}]
    expected = [theirs.image_token_id if i == IMAGE_TOKEN_INDEX else i for i in ours.encode_prompt(
        [{"role": "user", "content": "<image>\nWhat is on the table?"}, *turns[1:]]).input_ids]
    ids = theirs.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True,
                                     return_tensors="pt")["input_ids"][0].tolist()
    prefix_note = any("prefixes only the start" in note for note in setup.notes)
    assert (ids == expected, prefix_note) == ((True, False) if prepend_scheme == "always" else (False, True))
    assert setup.generation_config == {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                       "pad_token_id": ours.pad_token_id}  # no generation settings recorded


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("add_bos", [True, False])
def test_jinja_renders_the_vlsafe_template_text(template, add_bos):
    jinja = jinja_chat_template(template, add_bos=add_bos)
    chat = TEMPLATES[template]
    turns = [{"role": "user", "content": "<image>\n<image>\nCompare them."}, {"role": "assistant", "content": "Same."},
             {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes: 'quoted' \\ text."}]
    cases = [turns[:1], turns[:3], turns, [{"role": "system", "content": "Custom {{ system }}"}, *turns[:3]],
             [{"role": "system", "content": ""}, *turns[:1]]]
    for messages in cases:
        for generation in (True, False):
            if template == "plain" and messages[0]["role"] == "system":
                continue
            theirs, _ = render_jinja_template([messages], chat_template=jinja, add_generation_prompt=generation,
                                              bos_token="<s>", eos_token="</s>")
            ours = ("<s>" if add_bos else "") + chat.prompt_text(messages, eos="</s>", bos="<s>",
                                                                  add_generation_prompt=generation)
            assert theirs[0] == ours, (messages, generation)
    # list content (OpenAI/transformers form) is written as vlsafe's converters write a turn
    parts = [{"role": "user", "content": [{"type": "text", "text": " Compare them. "}, {"type": "image"},
                                          {"type": "image"}]}]
    theirs, _ = render_jinja_template([parts], chat_template=jinja, add_generation_prompt=True, bos_token="<s>",
                                      eos_token="</s>")
    assert theirs[0] == ("<s>" if add_bos else "") + chat.prompt_text(turns[:1], eos="</s>", bos="<s>")
    with pytest.raises(Exception, match="turn 1 has role user"):
        render_jinja_template([[turns[0], turns[0]]], chat_template=jinja, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ValueError, match="turn 1 has role 'user'"):
        chat.prompt_text([turns[0], turns[0]], eos="</s>")


def test_image_processor_matches_vlsafe_for_pad_and_resize(exported, tmp_path):
    """pad: LLaVA's expand2square (mean colour) + resize, both backends; resize: the square squash vlsafe uses
    with pad_to_square=False. transformers' default CLIP preprocessing (centre crop) would cut the wide image."""
    from transformers import AutoImageProcessor

    from vlsafe.core.interop import export_llava_hf
    from vlsafe.data.encoding.processor import VLMProcessor

    module, folder = exported["vicuna_v1"]
    image = _noisy_image()
    pad = module.processor.preprocess_image(_png(image))
    for backend in ("pil", "torchvision"):
        theirs = AutoImageProcessor.from_pretrained(folder, backend=backend)(image, return_tensors="pt")
        difference = (theirs["pixel_values"][0] - pad).abs().max().item()
        assert difference < (1e-5 if backend == "pil" else 0.02), (backend, difference)  # 0.015 = 1 grey level

    out = export_llava_hf(module.vlm, module.processor.tokenizer, tmp_path / "resize", image_preprocess="resize")
    squash = VLMProcessor(module.processor.tokenizer, image_size=64, num_image_tokens=64, pad_to_square=False)
    theirs = AutoImageProcessor.from_pretrained(out, backend="pil")(image, return_tensors="pt")["pixel_values"][0]
    assert (theirs - squash.preprocess_image(_png(image))).abs().max() < 1e-5
    cropped = export_llava_hf(module.vlm, module.processor.tokenizer, tmp_path / "crop")  # the library default
    theirs = AutoImageProcessor.from_pretrained(cropped, backend="pil")(image, return_tensors="pt")["pixel_values"][0]
    assert (theirs - pad).abs().max() > 0.5 and (theirs - squash.preprocess_image(_png(image))).abs().max() > 0.5
