"""The multimodal merge of upstream llava/model/llava_arch.py: per-image tile features to rows, spliced at -200."""

import math
import re

import torch
import torch.nn as nn

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import get_anyres_image_grid_shape


def unpad_image(tensor, original_size):
    """Cut the padding bands `resize_and_pad_image` added off a [C, H, W] feature map; size is (width, height)."""
    ow, oh = original_size
    ch, cw = tensor.shape[1:]
    if ow / oh > cw / ch:
        pad = (ch - int(oh * (cw / ow))) // 2
        return tensor[:, pad : ch - pad, :]
    pad = (cw - int(ow * (ch / oh))) // 2
    return tensor[:, :, pad : cw - pad]


class LlavaMetaForCausalLM:
    """Mixed into the causal LM; `get_model()` holds `vision_tower`, `mm_projector`, `image_newline`, `embed_tokens`."""

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def encode_images(self, images):
        return self.get_model().mm_projector(self.get_model().get_vision_tower()(images))

    def _merge_tiles(self, image_feature, image_sizes, image_idx):
        """[1 + tiles, grid*grid, D] features of image `image_idx` -> its rows, as the `spatial*` branch upstream
        (which reads `image_sizes` only for a tiled image)."""
        config, newline = self.config, self.get_model().image_newline
        merge = getattr(config, "mm_patch_merge_type", "flat")
        aspect = getattr(config, "image_aspect_ratio", "square")
        if image_feature.shape[0] == 1:
            rows = image_feature[0]
            return torch.cat((rows, newline[None]), dim=0) if "unpad" in merge else rows
        base, tiles = image_feature[0], image_feature[1:]
        side = self.get_vision_tower().num_patches_per_side
        assert side * side == base.shape[0]
        max_match = re.match(r"anyres_max_(\d+)", aspect) if "anyres_max" in aspect else None
        if aspect == "anyres" or "anyres_max" in aspect:
            cols, rows_ = get_anyres_image_grid_shape(
                image_sizes[image_idx], config.image_grid_pinpoints, self.get_vision_tower().image_size
            )
            tiles = tiles.view(rows_, cols, side, side, -1)
        else:
            tiles = tiles.view(2, 2, side, side, -1)
        if "unpad" in merge:
            # [rows, cols, side, side, D] -> [D, rows*side, cols*side]: tiles laid out as the canvas they came from
            canvas = tiles.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
            canvas = unpad_image(canvas, image_sizes[image_idx])
            if max_match:
                _, h, w = canvas.shape
                times = math.sqrt(h * w / (int(max_match.group(1)) * side**2))
                if times > 1.1:
                    canvas = nn.functional.interpolate(
                        canvas[None], [int(h // times), int(w // times)], mode="bilinear"
                    )[0]
            canvas = torch.cat((canvas, newline[:, None, None].expand(*canvas.shape[:-1], 1)), dim=-1)
            tiles = canvas.flatten(1, 2).transpose(0, 1)
        else:
            tiles = tiles.permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
        return torch.cat((base, tiles), dim=0)

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids,
        position_ids,
        attention_mask,
        past_key_values,
        labels,
        images,
        modalities=["image"],  # noqa: B006 (upstream signature)
        image_sizes=None,
    ):
        if self.get_vision_tower() is None or images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        if isinstance(modalities, str):
            modalities = [modalities]
        if "video" in modalities:
            raise NotImplementedError("the re-creation does not reproduce LLaVA-NeXT video (get_2dPool)")
        if type(images) is list or images.ndim == 5:
            images = [x.unsqueeze(0) if x.ndim == 3 else x for x in images]
            split_sizes = [x.shape[0] for x in images]
            features = torch.split(self.encode_images(torch.cat(images, dim=0)), split_sizes)
            if getattr(self.config, "mm_patch_merge_type", "flat") == "flat":
                image_features = [x.flatten(0, 1) for x in features]
            else:
                image_features = [self._merge_tiles(f, image_sizes, i) for i, f in enumerate(features)]
        else:
            image_features = self.encode_images(images)

        _labels, _position_ids, _attention_mask = labels, position_ids, attention_mask
        attention_mask = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        labels = torch.full_like(input_ids, IGNORE_INDEX) if labels is None else labels
        embed = self.get_model().embed_tokens
        new_embeds, new_labels, image_idx = [], [], 0
        for ids, lab, keep in zip(input_ids, labels, attention_mask):
            ids, lab = ids[keep], lab[keep]
            cuts = [-1] + torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist() + [ids.shape[0]]
            pieces, piece_labels = [], []
            for k in range(len(cuts) - 1):
                pieces.append(embed(ids[cuts[k] + 1 : cuts[k + 1]]))
                piece_labels.append(lab[cuts[k] + 1 : cuts[k + 1]])
                if k < len(cuts) - 2:
                    rows = image_features[image_idx]
                    image_idx += 1
                    pieces.append(rows)
                    piece_labels.append(torch.full((rows.shape[0],), IGNORE_INDEX, dtype=lab.dtype))
            if len(cuts) == 2:  # text-only: upstream still consumes one image slot
                image_idx += 1
            new_embeds.append(torch.cat(pieces))
            new_labels.append(torch.cat(piece_labels))
        limit = getattr(self.config, "tokenizer_model_max_length", None)
        new_embeds = [x[:limit] for x in new_embeds]
        new_labels = [x[:limit] for x in new_labels]
        longest, batch = max(x.shape[0] for x in new_embeds), len(new_embeds)
        padded_labels = torch.full((batch, longest), IGNORE_INDEX, dtype=new_labels[0].dtype)
        mask = torch.zeros((batch, longest), dtype=torch.bool)
        positions = torch.zeros((batch, longest), dtype=torch.long)
        padded = []
        for i, (e, lab) in enumerate(zip(new_embeds, new_labels)):
            n = e.shape[0]
            padded.append(torch.cat((e, e.new_zeros((longest - n, e.shape[1]))), dim=0))
            padded_labels[i, :n], mask[i, :n], positions[i, :n] = lab, True, torch.arange(n)
        return (
            None,
            None if _position_ids is None else positions,
            None if _attention_mask is None else mask.to(_attention_mask.dtype),
            past_key_values,
            torch.stack(padded),
            None if _labels is None else padded_labels,
        )
