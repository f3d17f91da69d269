"""A tiny random Phi-3 Vision checkpoint and an outside reference for it (test_phi3v.py).

transformers has no Phi-3 Vision class, so the checkpoint is assembled from the parts it does
have: a `Phi3ForCausalLM` (the text model, saved under its own names), a `CLIPVisionModel`
(saved under `model.vision_embed_tokens.img_processor.`), the learnable separators `sub_GN` /
`glb_GN` and the `img_projection.0` / `.2` MLP, in one model.safetensors with the published
checkpoints' key names, next to a Phi-3-V style config.json (architectures Phi3VForCausalLM,
img_processor, embd_layer; plus a `vision_config`, since the tower here is not ViT-L/14-336)
and a preprocessor_config.json (num_crops). The CLIP tower works on 112-px crops of 14-px
patches: an 8 x 8 grid merged into 4 x 4, so 16 rows per view.

`Phi3VReference` recomputes everything as the published processor and modeling code describe
it, with PIL, torch, transformers' CLIPVisionModel and Phi3ForCausalLM: pixels, features,
prompt ids (text split at `<|image_N|>` tags, each piece tokenized with its BOS), logits and
greedy generation from input embeddings.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from family_fixtures import COMMON, UNK_ID, write_tokenizer
from vision_fixtures import randomize

CROP = 112
PATCH = 14
NUM_CROPS = 4
MERGED = CROP // PATCH // 2  # 4: merged rows per view side
TEXT_VOCAB = 136
SPECIAL = ["<|user|>", "<|assistant|>", "<|end|>", "<|image|>"]
IMAGE_TOKEN_ID = 131
# Phi-3 Vision's prompt format, written for these tests: <|role|>\n content <|end|>\n, then <|assistant|>\n.
# Like the published template, it concatenates the content as a string (it takes text only).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + '\n' + m['content'] + '<|end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '<|assistant|>\n' }}{% endif %}"
)
HD_ORDER = "sub_glb"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_phi3v_checkpoint(directory: Path, seed: int = 0, hd_order: str = HD_ORDER) -> Path:
    import torch
    import transformers
    from safetensors.torch import save_file
    from tokenizers import AddedToken, Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    write_tokenizer(directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    # Phi-3's added tokens strip the whitespace after them (rstrip), <|image|> too.
    tokenizer.add_special_tokens([AddedToken(token, rstrip=True, normalized=False, special=True) for token in SPECIAL])
    tokenizer.save(str(directory / "tokenizer.json"))
    assert tokenizer.token_to_id("<|image|>") == IMAGE_TOKEN_ID
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))

    torch.manual_seed(seed)
    text_config = transformers.Phi3Config(**dict(COMMON, vocab_size=TEXT_VOCAB, rms_norm_eps=1e-2))
    text = transformers.Phi3ForCausalLM(text_config)
    vision_config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                  num_attention_heads=4, image_size=CROP, patch_size=PATCH)
    clip = transformers.CLIPVisionModel(vision_config)
    merged, hidden = 4 * vision_config.hidden_size, text_config.hidden_size
    projection = torch.nn.Sequential(torch.nn.Linear(merged, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
    separators = torch.nn.ParameterDict({"sub_GN": torch.nn.Parameter(torch.zeros(1, 1, 1, merged)),
                                         "glb_GN": torch.nn.Parameter(torch.zeros(1, 1, merged))})
    for index, module in enumerate((text, clip, projection, separators)):
        randomize(module, seed + index)
    with torch.no_grad():  # randomize() leaves non-norm 1-D tensors alone: the separators get unit noise
        for param in separators.values():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed + 7)))
    tensors = {name: value for name, value in text.state_dict().items()}
    prefix = "model.vision_embed_tokens."
    # The published checkpoints nest the tower as img_processor.vision_model.* (transformers 4's CLIPVisionModel).
    tensors.update({prefix + "img_processor.vision_model." + k.removeprefix("vision_model."): v
                    for k, v in clip.state_dict().items() if "position_ids" not in k})
    tensors.update({prefix + "img_projection." + k: v for k, v in projection.state_dict().items()})
    tensors.update({prefix + k: v.detach() for k, v in separators.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})

    raw = text_config.to_dict()
    raw.update(architectures=["Phi3VForCausalLM"], model_type="phi3_v", torch_dtype="float32",
               img_processor={"image_dim_out": vision_config.hidden_size, "model_name":
                              "openai/clip-vit-large-patch14-336", "name": "clip_vision_model",
                              "num_img_tokens": MERGED * MERGED},
               embd_layer={"embedding_cls": "image", "hd_transform_order": hd_order, "projection_cls": "mlp",
                           "use_hd_transform": True, "with_learnable_separator": True},
               vision_config={k: v for k, v in vision_config.to_dict().items()
                              if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                       "image_size", "patch_size", "hidden_act", "layer_norm_eps", "model_type")})
    (directory / "config.json").write_text(json.dumps(raw, indent=1))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Phi3VImageProcessor", "num_crops": NUM_CROPS, "num_img_tokens": MERGED * MERGED,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}))
    return directory


# --------------------------------------------------------------------------- the reference


def reference_resized(width: int, height: int, num_crops: int, crop: int) -> tuple[int, int]:
    """HD_transform's resize target (width >= height): the most crops across, `scale`, with
    scale * ceil(scale / ratio) <= num_crops."""
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    new_width = int((scale - 1) * crop)
    return new_width, int(new_width / ratio)


def reference_hd_size(width: int, height: int, num_crops: int, crop: int = 336) -> tuple[int, int]:
    """The processor's documented padded-size formula (calc_hd_transform_size): (width, height)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    new_width, new_height = reference_resized(width, height, num_crops, crop)
    padded_height = int(np.ceil(new_height / crop) * crop)
    return (padded_height, new_width) if transposed else (new_width, padded_height)


def reference_token_count(width: int, height: int, num_crops: int, crop: int = 336, merged: int = 12) -> int:
    """calc_num_image_tokens_from_image_size: ((h / crop) (w / crop) + 1) m^2 + 1 + (h / crop + 1) m."""
    w, h = reference_hd_size(width, height, num_crops, crop)
    return int((h // crop * (w // crop) + 1) * merged ** 2 + 1 + (h // crop + 1) * merged)


def hd_merge(features, h_crop: int, w_crop: int, sub_gn):
    """reshape_hd_patches_2x2merge then add_image_newline, as the published model code does:
    [h_crop * w_crop, side^2, C] -> [(h_crop * side / 2) * (w_crop * side / 2 + 1), 4C]."""
    import torch

    n, length, channels = features.shape
    side = int(math.isqrt(length))
    hd = (features.reshape(n, side, side, channels).reshape(n, side // 2, 2, side // 2, 2, channels)
          .permute(0, 1, 3, 2, 4, 5).reshape(n, -1, 4 * channels)
          .reshape(1, h_crop, w_crop, side // 2, side // 2, -1).permute(0, 1, 3, 2, 4, 5)
          .reshape(1, h_crop * side // 2, w_crop * side // 2, 4 * channels))
    newline = sub_gn.expand(1, hd.shape[1], -1, -1)
    return torch.cat([hd, newline], dim=2).reshape(1, -1, 4 * channels)[0]


def hd_layout(states, h_crop: int, w_crop: int, sub_gn, glb_gn, order: str):
    """The published hd_feature_transform before its projection: [1 + crops, side^2, C] (global
    view first) -> the image's rows."""
    import torch

    sub = hd_merge(states[1:], h_crop, w_crop, sub_gn)
    glb = hd_merge(states[:1], 1, 1, sub_gn)
    glb_gn = glb_gn.reshape(1, -1)
    return torch.cat([sub, glb_gn, glb] if order == "sub_glb" else [glb, glb_gn, sub])


class Phi3VReference:
    """The published Phi-3 Vision pipeline on the tiny checkpoint, in PIL / torch / transformers."""

    def __init__(self, directory: Path):
        import torch
        import transformers
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        raw = json.loads((directory / "config.json").read_text())
        self.order = raw["embd_layer"]["hd_transform_order"]
        tensors = load_file(str(directory / "model.safetensors"))
        prefix = "model.vision_embed_tokens."
        text_keys = {k: v for k, v in raw.items()
                     if k not in ("architectures", "model_type", "img_processor", "embd_layer", "vision_config")}
        self.text = transformers.Phi3ForCausalLM(transformers.Phi3Config(**text_keys)).eval()
        self.text.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(prefix)})
        self.text.config._attn_implementation = "eager"
        self.clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**raw["vision_config"])).eval()
        nested = "vision_model." if any(k.startswith("vision_model.") for k in self.clip.state_dict()) else ""
        tower = prefix + "img_processor.vision_model."
        self.clip.load_state_dict({nested + k[len(tower):]: v for k, v in tensors.items() if k.startswith(tower)},
                                  strict=False)
        hidden = raw["hidden_size"]
        merged = 4 * raw["vision_config"]["hidden_size"]
        self.projection = torch.nn.Sequential(torch.nn.Linear(merged, hidden), torch.nn.GELU(),
                                              torch.nn.Linear(hidden, hidden)).eval()
        self.projection.load_state_dict({k[len(prefix + "img_projection."):]: v for k, v in tensors.items()
                                         if k.startswith(prefix + "img_projection.")})
        self.sub_gn, self.glb_gn = tensors[prefix + "sub_GN"], tensors[prefix + "glb_GN"]
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.bos = self.tokenizer.token_to_id("<s>")

    # -- the image processor ------------------------------------------------------------

    def views(self, image, num_crops: int = NUM_CROPS):
        """(f32 [1 + h w, 3, crop, crop], (padded height, width)) as Phi3VImageProcessor.preprocess makes them."""
        import torch
        from PIL import Image

        from transformers.image_transforms import convert_to_rgb

        image = Image.fromarray(convert_to_rgb(image, return_numpy=True))  # do_convert_rgb (alpha onto white)
        transposed = image.width < image.height
        if transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        new_width, new_height = reference_resized(image.width, image.height, num_crops, CROP)
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)  # torchvision's resize on PIL
        target = int(np.ceil(new_height / CROP) * CROP)
        top = int((target - new_height) / 2)
        padded = Image.new("RGB", (new_width, target), (255, 255, 255))
        padded.paste(image, (0, top))
        if transposed:
            padded = padded.transpose(Image.Transpose.TRANSPOSE)
        tensor = torch.from_numpy(np.asarray(padded).copy()).permute(2, 0, 1).float().div(255)  # ToTensor
        tensor = (tensor - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
        h, w = tensor.shape[1:]
        global_view = torch.nn.functional.interpolate(tensor[None], size=(CROP, CROP), mode="bicubic")
        crops = tensor.reshape(1, 3, h // CROP, CROP, w // CROP, CROP).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, CROP,
                                                                                                            CROP)
        return torch.cat([global_view, crops]).numpy(), (h, w)

    # -- the image embedding ------------------------------------------------------------

    def image_features(self, image) -> np.ndarray:
        import torch

        views, (h, w) = self.views(image)
        with torch.inference_mode():
            states = self.clip(torch.from_numpy(views), output_hidden_states=True).hidden_states[-2][:, 1:]
            return self.projection(hd_layout(states, h // CROP, w // CROP, self.sub_gn, self.glb_gn,
                                             self.order)).numpy()

    # -- the processor's prompt ids -----------------------------------------------------

    def prompt_ids(self, text: str, images: list) -> list[int]:
        """Text split at `<|image_N|>`, each piece tokenized with BOS, -N x tokens per tag."""
        chunks = [[self.bos] + self.tokenizer.encode(chunk, add_special_tokens=False).ids
                  for chunk in re.split(r"<\|image_\d+\|>", text)]
        tags = [int(tag[len("<|image_"):-2]) for tag in re.findall(r"<\|image_\d+\|>", text)]
        counts = [reference_token_count(image.width, image.height, NUM_CROPS, CROP, MERGED) for image in images]
        ids: list[int] = []
        for index, chunk in enumerate(chunks):
            ids.extend(chunk)
            if index < len(tags):
                ids.extend([-tags[index]] * counts[tags[index] - 1])
        return ids

    def input_embeds(self, ids: list[int], images: list):
        """The model's embedding: token embeddings (negative ids clamped to 0), image rows at the tags."""
        import torch

        tensor = torch.tensor(ids)
        with torch.inference_mode():
            embeds = self.text.model.embed_tokens(tensor.clamp(min=0)).clone()
            for number, image in enumerate(images, start=1):
                embeds[tensor == -number] = torch.from_numpy(self.image_features(image))
        return embeds[None]

    def logits(self, ids: list[int], images: list) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.text(inputs_embeds=self.input_embeds(ids, images)).logits[0].numpy()

    def greedy(self, ids: list[int], images: list, new_tokens: int) -> list[int]:
        import torch

        with torch.inference_mode():
            out = self.text.generate(inputs_embeds=self.input_embeds(ids, images), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                     pad_token_id=UNK_ID, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        return out[0].tolist()[-new_tokens:]
