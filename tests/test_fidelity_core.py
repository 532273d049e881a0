"""docs/fidelity.md, LLaVA-1.5 core rows: vlsafe against the released LLaVA code, transcribed with file:line.

The released snippets below are transcriptions of haotian-liu/LLaVA@c121f04 (the lines named in each comment),
run on the same inputs as vlsafe. The last test keeps docs/fidelity.md honest: every DIFFERENT row names the
switch that gives the released behaviour, and every SAME row names its test (or says why it cannot have one).
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlsafe.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlsafe.data.encoding.processor import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VLMProcessor,
    image_bytes,
)
from vlsafe.data.encoding.templates import get_template
from vlsafe.data.images import decode_image

ROOT = Path(__file__).resolve().parents[1]

# llava/conversation.py:242-252 (conv_vicuna_v1) and :325-335 (conv_llava_v1), typed out from the release
RELEASED_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
RELEASED_LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                         "The assistant gives helpful, detailed, and polite answers to the human's questions.")

TURNS = [("USER", "<image>\nWhat is on the table, and why?"),
         ("ASSISTANT", "Two cups: one is empty.\nThe other, 3/4 full."),
         ("USER", "Any text on them?"), ("ASSISTANT", "Yes -- \"caf\u00e9\" in red.")]


def released_get_prompt(system: str, messages: list[tuple[str, str | None]]) -> str:
    """llava/conversation.py:54-63, SeparatorStyle.TWO with sep=" ", sep2="</s>"."""
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def as_messages(turns):
    return [{"role": "user" if role == "USER" else "assistant", "content": text} for role, text in turns]


@pytest.mark.parametrize("template,system", [("vicuna_v1", RELEASED_VICUNA_SYSTEM),
                                             ("llava_v1", RELEASED_LLAVA_SYSTEM)])
def test_conversation_template_is_byte_identical_to_the_released_get_prompt(template, system):
    rendered = get_template(template).prompt_text(as_messages(TURNS), eos="</s>", add_generation_prompt=False)
    assert rendered == released_get_prompt(system, TURNS)
    # inference: LLaVA appends (roles[1], None), which renders "ASSISTANT:" with no trailing space
    prompt = get_template(template).prompt_text(as_messages(TURNS[:3]), eos="</s>")
    assert prompt == released_get_prompt(system, TURNS[:3] + [("ASSISTANT", None)])


# ----------------------------------------------------------------------------- label masking
def sentencepiece_style_tokenizer():
    """A Llama-style tokenizer built offline: spaces become "▁", "▁" is prepended to every piece of text
    (also right after a special token, as Llama's legacy tokenizer does), BPE with byte fallback, BOS added.
    It is not Vicuna's vocabulary, but it has the space handling LLaVA's masking arithmetic depends on."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    corpus = [RELEASED_VICUNA_SYSTEM, "USER: ASSISTANT: What is on the table, and why? Any text on them?",
              "Two cups: one is empty. The other, 3/4 full. Yes red text"] * 5
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=list("\n\"-/:;,.?!'0123456789\u00e9"))
    core.train_from_iterator(corpus, trainer)
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  clean_up_tokenization_spaces=False)
    tok.pad_token = tok.unk_token  # llava/train/train.py:902-904 (v1: pad = unk)
    return tok


def released_tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    """llava/mm_utils.py:185-204."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split('<image>')]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids, offset = [], 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def released_preprocess_v1(conversation: str, tokenizer, has_image: bool, legacy: bool = True):
    """llava/train/train.py:438-492 (mask targets), for one rendered conversation."""
    if has_image:
        input_ids = torch.tensor(released_tokenizer_image_token(conversation, tokenizer))
    else:
        input_ids = torch.tensor(tokenizer(conversation).input_ids)
    target = input_ids.clone()
    sep = " " + "ASSISTANT" + ": "
    total_len = int(target.ne(tokenizer.pad_token_id).sum())
    rounds = conversation.split("</s>")
    cur_len = 1
    target[:cur_len] = IGNORE_INDEX
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if has_image:
            round_len = len(released_tokenizer_image_token(rou, tokenizer))
            instruction_len = len(released_tokenizer_image_token(parts[0], tokenizer)) - 2
        else:
            round_len = len(tokenizer(rou).input_ids)
            instruction_len = len(tokenizer(parts[0]).input_ids) - 2
        if i != 0 and not legacy:
            round_len -= 1
            instruction_len -= 1
        target[cur_len:cur_len + instruction_len] = IGNORE_INDEX
        cur_len += round_len
    target[cur_len:] = IGNORE_INDEX
    assert cur_len == total_len, "released code would mask the whole sample (tokenization mismatch)"
    return input_ids.tolist(), target.tolist()


def expand_images(ids: list[int], labels: list[int], n: int) -> tuple[list[int], list[int]]:
    """llava/model/llava_arch.py:240-268: each IMAGE_TOKEN_INDEX becomes n feature slots labelled IGNORE."""
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        out_ids += [token] * (n if token == IMAGE_TOKEN_INDEX else 1)
        out_labels += [IGNORE_INDEX] * n if token == IMAGE_TOKEN_INDEX else [label]
    return out_ids, out_labels


@pytest.mark.parametrize("turns", [TURNS, TURNS[:2], [(r, t.replace("<image>\n", "")) for r, t in TURNS]],
                         ids=["image-two-rounds", "image-one-round", "text-only"])
def test_label_masking_equals_released_preprocess_v1(turns):
    tokenizer = sentencepiece_style_tokenizer()
    has_image = "<image>" in turns[0][1]
    conversation = released_get_prompt(RELEASED_VICUNA_SYSTEM, turns)
    ids, labels = released_preprocess_v1(conversation, tokenizer, has_image)
    ids, labels = expand_images(ids, labels, 7)
    processor = VLMProcessor(tokenizer, "vicuna_v1", image_size=28, num_image_tokens=7, max_length=2048)
    encoded = processor.encode_conversation(as_messages(turns))
    assert encoded.input_ids == ids, "token ids differ from LLaVA's tokenizer_image_token"
    assert encoded.labels == labels, "supervised tokens differ from LLaVA's preprocess_v1"
    # what that supervision is: every reply's tokens plus its </s>, nothing of the prompt
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert supervised.count(tokenizer.eos_token_id) == len(turns) // 2


def test_truncation_cuts_where_llava_cuts():
    """llava/train/train.py:758-759 cuts the (one-slot-per-image) ids and labels at model_max_length, and
    llava_arch.py:274-277 cuts the expanded sequence again; vlsafe cuts the expanded sequence once."""
    tokenizer = sentencepiece_style_tokenizer()
    conversation = released_get_prompt(RELEASED_VICUNA_SYSTEM, TURNS)
    ids, labels = expand_images(*released_preprocess_v1(conversation, tokenizer, True), 7)
    max_length = len(ids) - 5  # the cut lands in the last reply, after the image
    processor = VLMProcessor(tokenizer, "vicuna_v1", image_size=28, num_image_tokens=7, max_length=max_length)
    encoded = processor.encode_conversation(as_messages(TURNS))
    assert encoded.truncated and encoded.input_ids == ids[:max_length] and encoded.labels == labels[:max_length]


# ----------------------------------------------------------------------------- images
def released_expand2square(pil_img, background_color):
    """llava/train/train.py:703-714."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def clip_336_processor():
    """openai/clip-vit-large-patch14-336's preprocessor_config.json values (no hub access in tests), on the PIL
    backend: LLaVA's pinned transformers (4.37) resized with PIL; transformers 5 defaults to torchvision, whose
    bicubic differs by one grey level on some pixels."""
    try:
        from transformers.models.clip.image_processing_pil_clip import (
            CLIPImageProcessorPil,
        )
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil

    return CLIPImageProcessorPil(do_resize=True, size={"shortest_edge": 336}, resample=3, do_center_crop=True,
                              crop_size={"height": 336, "width": 336}, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=True, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
                              do_convert_rgb=True)


def photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    generator = torch.Generator().manual_seed(width * 1000 + height)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB").convert(mode)


@pytest.mark.parametrize("size", [(400, 250), (210, 380), (336, 336)], ids=["wide", "tall", "square"])
def test_image_pixels_equal_llava_pad_then_clip_processor(size, tokenizer):
    """train.py:701 convert('RGB'), :715 expand2square(int(mean*255)), :716 CLIPImageProcessor.preprocess."""
    image = photo(*size)
    released = clip_336_processor()
    background = tuple(int(x * 255) for x in released.image_mean)
    expected = released.preprocess(released_expand2square(image.convert("RGB"), background),
                                   return_tensors="pt")["pixel_values"][0]
    processor = VLMProcessor(tokenizer, "vicuna_v1", image_size=336, num_image_tokens=576)
    ours = processor.preprocess_image(image_bytes(image))
    assert ours.shape == expected.shape == (3, 336, 336)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "1"])
def test_decoding_equals_pil_convert_rgb_on_images_without_alpha(mode):
    """LLaVA opens every image with `.convert('RGB')` (train.py:701); vlsafe composites alpha on white. On
    images with no alpha channel (every photo format in LLaVA-665k) the two give identical pixels."""
    image = photo(48, 32, mode)
    fmt = "JPEG" if mode in ("CMYK",) else "PNG"
    data = image_bytes(image, fmt)
    reference = Image.open(io.BytesIO(data)).convert("RGB")
    assert decode_image(data).tobytes() == reference.tobytes()


def test_transparent_pixels_differ_from_llava_unless_rgb_mode_pil(tokenizer):
    """The one case where the conversions differ: a transparent pixel keeps its hidden RGB under LLaVA.
    `rgb_mode="pil"` gives LLaVA's pixels, through the processor and through pre-sized shards."""
    from vlsafe.data.images import Presize, presize_image, presized_pixels

    image = Image.new("RGBA", (40, 20), (10, 20, 30, 0))
    image.paste((200, 100, 50, 255), (0, 0, 20, 20))
    data = image_bytes(image)
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((30, 10)) == (10, 20, 30)
    assert decode_image(data).getpixel((30, 10)) == (255, 255, 255)
    assert decode_image(data, rgb_mode="pil").getpixel((30, 10)) == (10, 20, 30)
    released = clip_336_processor()
    background = tuple(int(x * 255) for x in released.image_mean)
    expected = released.preprocess(released_expand2square(Image.open(io.BytesIO(data)).convert("RGB"), background),
                                   return_tensors="pt")["pixel_values"][0]
    pil = VLMProcessor(tokenizer, "vicuna_v1", image_size=336, num_image_tokens=576, rgb_mode="pil")
    assert torch.allclose(pil.preprocess_image(data), expected, atol=1e-5)
    composite = VLMProcessor(tokenizer, "vicuna_v1", image_size=336, num_image_tokens=576)
    assert not torch.allclose(composite.preprocess_image(data), expected, atol=1e-2)
    # pre-sized shards record the mode, and a processor with the other mode refuses them
    stored, _ = presize_image(data, Presize.for_processor(pil), "s1", "images[0]")
    assert torch.equal(pil.preprocess_image(stored, normalize=False), pil.preprocess_image(data, normalize=False))
    with pytest.raises(Exception, match="rgb_mode"):
        presized_pixels(stored, Presize.for_processor(composite), "s1", "images[0]")
    with pytest.raises(ValueError, match="rgb_mode must be one of"):
        VLMProcessor(tokenizer, "vicuna_v1", rgb_mode="drop")


# ----------------------------------------------------------------------------- model parts and optimiser
def test_projector_parameter_names_and_image_token_count():
    """llava/model/multimodal_projector/builder.py:38-45: mlp2x_gelu = Sequential(Linear, GELU, Linear), saved
    as mm_projector.0.* / mm_projector.2.*; ViT-L/14 at 336 px gives (336/14)^2 = 576 patch tokens."""
    import open_clip
    from torch import nn

    from vlsafe.core.projector import build_projector

    released = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 4096))
    ours = build_projector("mlp2x_gelu", 1024, 4096)
    assert list(ours.state_dict()) == list(released.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    vision = open_clip.get_model_config("ViT-L-14-336")["vision_cfg"]
    assert (vision["image_size"] // vision["patch_size"]) ** 2 == 576


def released_decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """llava/train/llava_trainer.py:163-164: not inside a LayerNorm (transformers' ALL_LAYERNORM_LAYERS, which
    LLaVA's pinned transformers extends with LlamaRMSNorm) and no "bias" in the name."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm_types = (torch.nn.LayerNorm, LlamaRMSNorm)
    excluded = {f"{module_name}.{p}" if module_name else p for module_name, module in model.named_modules()
                if isinstance(module, norm_types) for p, _ in module.named_parameters(recurse=False)}
    return {name for name, _ in model.named_parameters() if name not in excluded and "bias" not in name}


@pytest.fixture(scope="module")
def tiny_vlm(tiny_vlm_builder):
    """One tiny VLM for the model-part tests (each test that changes it works on a deep copy)."""
    vlm, _ = tiny_vlm_builder.build()
    return vlm


def test_optimizer_groups_follow_llava_create_optimizer(tiny_vlm):
    """llava_trainer.py:165-194: weight decay except on biases and norms; the projector ("mm_projector") gets
    mm_projector_lr. vlsafe groups by the same rule (its projector is `projector.*`)."""
    import copy
    from types import SimpleNamespace

    from vlsafe.methods.base import OptimSettings
    from vlsafe.methods.sft import SFTModule

    vlm = copy.deepcopy(tiny_vlm)
    vlm.vision.requires_grad_(False)  # LLaVA-1.5 stage 2: frozen tower (see the table for a trained one)
    module = SimpleNamespace(vlm=vlm, optim=OptimSettings(lr=1e-3, projector_lr=5e-4, weight_decay=0.1))
    groups = SFTModule._param_groups(module)  # the method's own grouping, on a trainable LLM and projector
    names = {id(p): n for n, p in vlm.named_parameters()}
    decay = released_decay_parameter_names(vlm)
    seen = set()
    for group in groups:
        for param in group["params"]:
            name = names[id(param)]
            seen.add(name)
            assert (group["weight_decay"] == 0.1) == (name in decay), name
            assert group["lr"] == (5e-4 if name.startswith("projector.") else 1e-3), name
    assert seen == {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert any(n.startswith("projector.") for n in seen) and any(n not in decay for n in seen)


def released_find_all_linear_names(model: torch.nn.Module) -> set[str]:
    """llava/train/train.py:169-182."""
    lora_module_names = set()
    for name, module in model.named_modules():
        if any(k in name for k in ['mm_projector', 'vision_tower', 'vision_resampler']):
            continue
        if isinstance(module, torch.nn.Linear):
            names = name.split('.')
            lora_module_names.add(names[0] if len(names) == 1 else names[-1])
    lora_module_names.discard('lm_head')
    return lora_module_names


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]], ids=["llava-all-linear", "lrv-q-v"])
def test_lora_wraps_the_released_target_modules(tiny_vlm, targets):
    """LLaVA (train.py:862-869, find_all_linear_names on the LLM) and LRV-V2 (utils/model_worker.py:53,
    target_modules=r'.*language_model.*\\.(q_proj|v_proj)')."""
    import copy

    from vlsafe.core.lora import LoraSettings, set_trainable

    vlm = copy.deepcopy(tiny_vlm)
    llm_linear = {name for name, m in vlm.llm.named_modules() if isinstance(m, torch.nn.Linear)}
    if targets == "all-linear":
        released = {n for n in llm_linear if n.rsplit(".", 1)[-1] in released_find_all_linear_names(vlm.llm)}
    else:  # mPLUG-Owl names its LLM `language_model`
        pattern = r'.*language_model.*\.(q_proj|v_proj)'
        released = {n for n in llm_linear if re.fullmatch(pattern, "language_model." + n)}
    set_trainable(vlm, lora=LoraSettings(r=4, alpha=8, target_modules=targets))
    wrapped = {name.removeprefix("base_model.model.") for name, m in vlm.llm.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == released and wrapped


# ----------------------------------------------------------------------------- the table itself
FIDELITY = ROOT / "docs" / "fidelity.md"
EMPTY_SWITCH = {"", "-", "\u2014", "none", "n/a", "na"}


def split_row(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def fidelity_rows() -> tuple[list[tuple[int, list[str]]], list[int]]:
    """(line number, cells) of every body row of the six-column tables of docs/fidelity.md, and the line numbers
    of rows in those tables that do not have six cells (an unescaped `|` inside a cell, a missing column)."""
    rows, malformed, header = [], [], None
    for number, line in enumerate(FIDELITY.read_text(encoding="utf-8").splitlines(), 1):
        if not line.startswith("|"):
            header = None
            continue
        cells = split_row(line)
        if header is None:
            header = cells
        elif set("".join(cells)) <= set("-: "):
            continue
        elif len(header) == 6 and len(cells) == 6:
            rows.append((number, cells))
        elif len(header) == 6:
            malformed.append(number)
    return rows, malformed


def test_fidelity_table_rows_name_their_switch_or_test():
    rows, malformed = fidelity_rows()
    assert len(rows) >= 20, "docs/fidelity.md lost its tables"
    problems = [f"line {number}: not six cells (escape a `|` inside a cell as `\\|`)" for number in malformed]
    for number, (point, _released, _vlsafe, verdict, switch, test) in rows:
        verdict_word = verdict.strip("*").upper()
        if verdict_word.startswith("DIFFERENT"):
            text = switch.strip("`* ").lower()
            if text in EMPTY_SWITCH or (text.startswith("no switch") and len(text) < 40):
                problems.append(f"line {number} ({point}): DIFFERENT without a switch")
        elif verdict_word.startswith("SAME"):
            if test.strip("`* ").lower() in EMPTY_SWITCH and "not checkable offline:" not in test:
                problems.append(f"line {number} ({point}): SAME without a test")
            if "not checkable offline" in test and not re.search(r"not checkable offline: \S", test):
                problems.append(f"line {number} ({point}): 'not checkable offline' must say why")
    assert not problems, "\n".join(problems)


def test_named_tests_exist():
    """Every `tests/...py::name` a row of the table cites exists (so a renamed test cannot leave a stale claim)."""
    missing = []
    for number, cells in fidelity_rows()[0]:
        for path, name in re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", cells[5]):
            file = ROOT / path
            if not file.exists() or (name and not re.search(rf"def {name}\b", file.read_text(encoding="utf-8"))):
                missing.append(f"line {number}: {path}{'::' + name if name else ''}")
    assert not missing, "\n".join(missing)


# ----------------------------------------------------------------------------- the recipes use those settings
CORE_RECIPES = ["sft.yaml", "sft_lora.yaml", "vlguard_mixed.yaml", "vlguard_mixed_lora.yaml", "vlguard_posthoc.yaml",
                "vlguard_posthoc_lora.yaml", "lrv.yaml"]


@pytest.mark.parametrize("recipe", CORE_RECIPES)
def test_llava_recipes_carry_the_released_core_settings(recipe):
    """scripts/v1_5/finetune.sh / finetune_lora.sh: --version v1, --model_max_length 2048, --mm_projector_type
    mlp2x_gelu, --mm_vision_select_layer -2, --lora_r 128 --lora_alpha 256 on find_all_linear_names."""
    import inspect

    from vlsafe.builders import FromParts
    from vlsafe.reliability.recipe_overlays import config_chain
    from vlsafe.tools.plan import load_recipe

    model = load_recipe([str(path) for path in config_chain(ROOT / "recipes" / recipe)])["model"]["init_args"]
    vlm = model["vlm"]["init_args"]
    assert vlm["template"] == "vicuna_v1" and vlm["max_length"] == 2048
    if model["vlm"]["class_path"].endswith("FromParts"):
        defaults = inspect.signature(FromParts).parameters
        assert vlm.get("projector", defaults["projector"].default) == "mlp2x_gelu"
        assert vlm.get("select_layer", defaults["select_layer"].default) == -2
    lora = model.get("lora")
    if lora is not None:
        expected = [["q_proj", "v_proj"], 8, 32] if recipe == "lrv.yaml" else ["all-linear", 128, 256]
        assert [lora["target_modules"], lora["r"], lora["alpha"]] == expected and lora["dropout"] == 0.05
