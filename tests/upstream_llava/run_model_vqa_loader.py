"""Run upstream `llava/eval/model_vqa_loader.py` unchanged on CPU (upstream env): its `.cuda()` and
`.to(device='cuda')` calls are sent to the CPU and its model is loaded onto the CPU. Arguments are the script's,
after an optional `--cast DTYPE`: the loaded model is cast to DTYPE, and so are the images it sends as float16.

    python run_model_vqa_loader.py [--cast float32] --model-path DIR --question-file Q --image-folder I ...
"""

import sys

import torch

if __name__ == "__main__":
    import runpy

    import llava.model.builder as builder

    args = sys.argv[1:]
    cast = None
    if args[:1] == ["--cast"]:
        cast, args = getattr(torch, args[1]), args[2:]
    tensor_to = torch.Tensor.to
    load_pretrained_model = builder.load_pretrained_model

    def to_cpu(self, *args, **kwargs):
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        if cast is not None and kwargs.get("dtype") == torch.float16:
            kwargs["dtype"] = cast
        return tensor_to(self, *("cpu" if a == "cuda" else a for a in args), **kwargs)

    def load_on_cpu(*args, **kwargs):
        tokenizer, model, image_processor, context_len = load_pretrained_model(
            *args, device_map="cpu", device="cpu", **kwargs
        )
        return tokenizer, model if cast is None else model.to(cast), image_processor, context_len

    torch.Tensor.to = to_cpu
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    builder.load_pretrained_model = load_on_cpu
    sys.argv = ["model_vqa_loader.py", *args]
    runpy.run_module("llava.eval.model_vqa_loader", run_name="__main__")
