"""Anyres tiling (upstream llava/mm_utils.py): pick a canvas, pad the image onto it, cut it into tower-sized tiles."""

import ast
import math
import re

import torch
from PIL import Image


def _pinpoint_list(grid_pinpoints, tile):
    """Upstream accepts a list, its literal string, or the range form "(1x1),...,(6x6)" in units of the tile."""
    if isinstance(grid_pinpoints, str) and "x" in grid_pinpoints:
        assert tile in [224, 336, 384, 448, 512], "patch_size should be in [224, 336, 384, 448, 512]"
        found = re.findall(r"\((\d+)x(\d+)\)", grid_pinpoints)
        first, last = tuple(map(int, found[0])), tuple(map(int, found[-1]))
        return [[i * tile, j * tile] for i in range(first[0], last[0] + 1) for j in range(first[1], last[1] + 1)]
    if type(grid_pinpoints) is list:
        return grid_pinpoints
    return ast.literal_eval(grid_pinpoints)


def select_best_resolution(original_size, possible_resolutions):
    """(width, height) of the candidate that keeps the most image pixels, then wastes the fewest."""
    ow, oh = original_size
    chosen, most_kept, least_wasted = None, 0, float("inf")
    for w, h in possible_resolutions:
        s = min(w / ow, h / oh)
        kept = min(int(ow * s) * int(oh * s), ow * oh)
        wasted = w * h - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            chosen, most_kept, least_wasted = (w, h), kept, wasted
    return chosen


def resize_and_pad_image(image, target_resolution):
    """Fit the image inside the canvas (aspect kept, ceil on the short side) and centre it on black.
    The side is `ceil(side * scale)` with the scale divided first, as upstream: 800 * (672 / 600) is 896.0000000000001,
    so 800x600 on a 1008x672 canvas is resized to 897 pixels wide, not 896."""
    ow, oh = image.size
    tw, th = target_resolution
    scale_w, scale_h = tw / ow, th / oh
    if scale_w < scale_h:
        nw, nh = tw, min(math.ceil(oh * scale_w), th)
    else:
        nw, nh = min(math.ceil(ow * scale_h), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def divide_to_patches(image, patch_size):
    """Row-major tiles of `patch_size` pixels."""
    w, h = image.size
    return [
        image.crop((x, y, x + patch_size, y + patch_size))
        for y in range(0, h, patch_size)
        for x in range(0, w, patch_size)
    ]


def get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size):
    """(tiles across, tiles down) that `process_anyres_image` produced for an image of `image_size`."""
    w, h = select_best_resolution(image_size, _pinpoint_list(grid_pinpoints, patch_size))
    return w // patch_size, h // patch_size


def process_anyres_image(image, processor, grid_pinpoints):
    """[1 + tiles, C, H, W]: the whole image squashed to the tower's side, then each tile of the padded canvas."""
    try:
        tile = processor.size[0]
    except Exception:
        tile = processor.size["shortest_edge"]
    best = select_best_resolution(image.size, _pinpoint_list(grid_pinpoints, tile))
    tiles = divide_to_patches(resize_and_pad_image(image, best), processor.crop_size["height"])
    side = processor.size["shortest_edge"] if isinstance(processor.size, dict) else min(processor.size)
    pieces = [image.resize((side, side))] + tiles
    return torch.stack([processor.preprocess(p, return_tensors="pt")["pixel_values"][0] for p in pieces], dim=0)
