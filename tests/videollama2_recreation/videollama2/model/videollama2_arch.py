import einops
import torch
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from ..constants import IGNORE_INDEX, MODAL_INDEX_MAP, NUM_FRAMES


class CLIPVisionTower(nn.Module):
    """Weights from the tower's path when `initialize_vision_modules` builds it (`load_pretrained=True`); built
    from its config when the model is (re)loaded from a VideoLLaMA2 checkpoint, whose weights then fill it. Frozen
    by train.py, not here."""

    def __init__(self, vision_tower, args, load_pretrained=False):
        super().__init__()
        self.vision_tower_name = vision_tower
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        self.image_processor = CLIPImageProcessor.from_pretrained(vision_tower)
        if load_pretrained:
            self.vision_tower = CLIPVisionModel.from_pretrained(vision_tower)
        else:
            self.vision_tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(vision_tower))

    @torch.no_grad()
    def forward(self, images):
        out = self.vision_tower(images, output_hidden_states=True)  # CLIP casts the pixels to its own dtype
        features = out.hidden_states[self.select_layer]
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"Unexpected select feature: {self.select_feature}")
        return (features[:, 1:] if self.select_feature == "patch" else features).to(images.dtype)

    @property
    def dtype(self):
        return self.vision_tower.dtype

    @property
    def hidden_size(self):
        return self.vision_tower.config.hidden_size

    @property
    def image_size(self):
        return self.vision_tower.config.image_size


class STCConnector(nn.Module):
    """Upstream's STC connector, shapes only: [b, t, n, d] -> stage 1 per frame (upstream: timm RegStage, stride 1;
    here a 1x1 conv, same spatial shape) -> `sampler` over (t, h, w) -> stage 2 per frame -> [b, t'*h'*w', hidden]
    -> readout MLP. The sampler is upstream's: Conv3d kernel 2, stride 2, padding 1, then SiLU."""

    def __init__(self, config, downsample=(2, 2, 2)):
        super().__init__()
        hidden = config.hidden_size
        self.s1 = nn.Conv2d(config.mm_hidden_size, hidden, 1)
        self.sampler = nn.Sequential(nn.Conv3d(hidden, hidden, downsample, stride=downsample, padding=1), nn.SiLU())
        self.s2 = nn.Conv2d(hidden, hidden, 1)
        self.readout = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x):
        t = x.size(1)
        hw = int(x.size(2) ** 0.5)
        x = einops.rearrange(x, "b t (h w) d -> (b t) d h w", h=hw, w=hw)
        x = einops.rearrange(self.s1(x), "(b t) d h w -> b d t h w", t=t)
        x = self.sampler(x)
        new_t = x.size(2)
        x = self.s2(einops.rearrange(x, "b d t h w -> (b t) d h w"))
        return self.readout(einops.rearrange(x, "(b t) d h w -> b (t h w) d", t=new_t))


class STPConnector(STCConnector):
    """Upstream's STP connector: the sampler is AvgPool3d((2, 2, 2)) without padding, then SiLU."""

    def __init__(self, config, downsample=(2, 2, 2)):
        super().__init__(config, downsample)
        self.sampler = nn.Sequential(nn.AvgPool3d(downsample), nn.SiLU())


class STCConnectorV35(STCConnector):
    """Upstream's stc_connector_v35: the Conv3d sampler without padding."""

    def __init__(self, config, downsample=(2, 2, 2)):
        super().__init__(config, downsample)
        hidden = config.hidden_size
        self.sampler = nn.Sequential(nn.Conv3d(hidden, hidden, downsample, stride=downsample, padding=0), nn.SiLU())


CONNECTORS = {"stc_connector": STCConnector, "stp_connector": STPConnector, "stc_connector_v35": STCConnectorV35}


def build_vision_projector(config):
    """`linear`, `mlp2x_gelu` and the STC / STP connectors (spatial_conv, spatial_pool are not re-created)."""
    if config.mm_projector_type == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)
    if config.mm_projector_type == "mlp2x_gelu":
        return nn.Sequential(
            nn.Linear(config.mm_hidden_size, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
    if config.mm_projector_type in CONNECTORS:
        return CONNECTORS[config.mm_projector_type](config)
    raise ValueError(f"projector {config.mm_projector_type} is not in the re-creation")


class Videollama2MetaModel:
    def __init__(self, config):
        super().__init__(config)
        if hasattr(config, "mm_vision_tower"):
            self.vision_tower = CLIPVisionTower(config.mm_vision_tower, config)
            self.mm_projector = build_vision_projector(config)

    def get_vision_tower(self):
        return getattr(self, "vision_tower", None)

    def initialize_vision_modules(self, model_args, fsdp=None):
        self.config.mm_vision_tower = model_args.vision_tower
        self.config.mm_vision_select_layer = model_args.mm_vision_select_layer
        self.config.mm_vision_select_feature = model_args.mm_vision_select_feature
        if self.get_vision_tower() is None:  # a checkpoint that has one keeps it
            self.vision_tower = CLIPVisionTower(model_args.vision_tower, model_args, load_pretrained=True)
        self.config.use_mm_proj = True
        self.config.mm_projector_type = getattr(model_args, "mm_projector_type", "linear")
        self.config.mm_hidden_size = self.vision_tower.hidden_size
        if getattr(self, "mm_projector", None) is None:
            self.mm_projector = build_vision_projector(self.config)
        else:  # upstream: "in case it is frozen by LoRA"
            for p in self.mm_projector.parameters():
                p.requires_grad = True
        if model_args.pretrain_mm_mlp_adapter is not None:
            weights = torch.load(model_args.pretrain_mm_mlp_adapter, map_location="cpu")
            self.mm_projector.load_state_dict(
                {k.split("mm_projector.")[1]: v for k, v in weights.items() if "mm_projector" in k}, strict=False
            )


class Videollama2MetaForCausalLM:
    def get_model(self):
        raise NotImplementedError

    def num_frames(self):
        return getattr(self.config, "num_frames", NUM_FRAMES)

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def encode_images_or_videos(self, images):
        frames = [data.expand(self.num_frames(), -1, -1, -1) if modal == "image" else data for data, modal in images]
        batch = torch.stack(frames, dim=0)
        assert len(batch.size()) == 5
        features = self.get_model().get_vision_tower()(einops.rearrange(batch, "b t c h w -> (b t) c h w"))
        features = einops.rearrange(features, "(b t) n h -> b t n h", b=batch.shape[0])
        return self.temporal_aggregator(features)

    def temporal_aggregator(self, frames_features):
        if self.config.mm_projector_type in ("mlp2x_gelu", "linear"):
            return self.get_model().mm_projector(frames_features.mean(1))
        if "tc_connector" in self.config.mm_projector_type or "tp_connector" in self.config.mm_projector_type:
            return self.get_model().mm_projector(frames_features)
        raise ValueError(f"projector {self.config.mm_projector_type} is not in the re-creation")

    def prepare_inputs_labels_for_multimodal(self, input_ids, attention_mask, past_key_values, labels, images):
        if self.get_vision_tower() is None or images is None or input_ids.shape[1] == 1:
            return input_ids, attention_mask, past_key_values, None, labels
        features = self.encode_images_or_videos(images)
        embed = self.get_model().embed_tokens
        modal_ids = list(MODAL_INDEX_MAP.values())
        new_embeds, new_labels, feature_idx = [], [], 0
        for b, ids in enumerate(input_ids):  # padding stays inside each sample
            is_modal = sum(ids == m for m in modal_ids).bool()
            if not is_modal.any():  # text only: two halves around a zero-length slice of one feature block
                half = ids.shape[0] // 2
                new_embeds.append(torch.cat([embed(ids[:half]), features[feature_idx][0:0], embed(ids[half:])]))
                new_labels.append(labels[b] if labels is not None else None)
                feature_idx += 1
                continue
            # without labels (generation) the same splice runs on all-ignored placeholders, dropped at the end
            cur_labels = labels[b] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            pieces, piece_labels = [], []
            while is_modal.any():
                start = int(is_modal.nonzero()[0])
                block = features[feature_idx]
                pieces += [embed(ids[:start]), block]
                piece_labels += [cur_labels[:start], cur_labels.new_full((block.shape[0],), IGNORE_INDEX)]
                feature_idx += 1
                ids, cur_labels = ids[start + 1 :], cur_labels[start + 1 :]
                is_modal = sum(ids == m for m in modal_ids).bool()
            if ids.numel():
                pieces.append(embed(ids))
                piece_labels.append(cur_labels)
            new_embeds.append(torch.cat(pieces))
            new_labels.append(torch.cat(piece_labels))
        length = max(x.shape[0] for x in new_embeds)
        grown = [x.shape[0] - input_ids.shape[1] for x in new_embeds]
        embeds = torch.stack([torch.cat([x, x.new_zeros(length - x.shape[0], x.shape[1])]) for x in new_embeds])
        merged_labels = None
        if labels is not None:
            merged_labels = torch.stack(
                [torch.cat([x, x.new_full((length - x.shape[0],), IGNORE_INDEX)]) for x in new_labels]
            )
        if attention_mask is not None:
            # a True block as long as the growth goes in front of each row's mask; False pads the tail
            attention_mask = torch.stack(
                [
                    torch.cat([m.new_ones(g), m, m.new_zeros(length - input_ids.shape[1] - g)])
                    for m, g in zip(attention_mask, grown)
                ]
            )
        return None, attention_mask, past_key_values, embeds, merged_labels


def videollama2_classes(llm: str, config_cls, model_cls, causal_lm_cls, sets_labels: bool):
    """The `Videollama2{LLM}Config / Model / ForCausalLM` triple each `videollama2_<llm>.py` defines upstream.

    The forward merges, then calls the HF parent forward **without** `position_ids` (upstream accepts them and
    drops them, so the parent numbers the merged sequence 0..L-1). Mistral's sets `outputs.labels` (the merged
    labels); Qwen2's returns the parent's output as it is (`sets_labels=False`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = type(f"Videollama2{llm}Config", (config_cls,), {"model_type": f"videollama2_{llm.lower()}"})
    model = type(f"Videollama2{llm}Model", (Videollama2MetaModel, model_cls), {"config_class": config})

    def __init__(self, config, **kwargs):
        super(causal_lm_cls, self).__init__(config)
        self.model = model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        images=None,
        return_dict=None,
        **kwargs,
    ):
        if inputs_embeds is None:
            input_ids, attention_mask, past_key_values, inputs_embeds, labels = (
                self.prepare_inputs_labels_for_multimodal(input_ids, attention_mask, past_key_values, labels, images)
            )
        outputs = causal_lm_cls.forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        if sets_labels:
            outputs.labels = labels
        return outputs

    namespace = {"config_class": config, "__init__": __init__, "forward": forward, "get_model": lambda self: self.model}
    causal_lm = type(f"Videollama2{llm}ForCausalLM", (causal_lm_cls, Videollama2MetaForCausalLM), namespace)
    AutoConfig.register(config.model_type, config)
    AutoModelForCausalLM.register(config, causal_lm)
    return config, model, causal_lm
