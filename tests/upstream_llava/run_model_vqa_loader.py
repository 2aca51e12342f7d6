"""Run upstream `llava/eval/model_vqa_loader.py` unchanged on CPU (upstream env): its `.cuda()` and
`.to(device='cuda')` calls are sent to the CPU and its model is loaded onto the CPU. Arguments are the script's.

    python run_model_vqa_loader.py --model-path DIR --question-file Q --image-folder I --answers-file A ...
"""

import functools
import runpy
import sys

import torch

if __name__ == "__main__":
    import llava.model.builder as builder

    tensor_to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        return tensor_to(self, *("cpu" if a == "cuda" else a for a in args), **kwargs)

    torch.Tensor.to = to_cpu
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    builder.load_pretrained_model = functools.partial(builder.load_pretrained_model, device_map="cpu", device="cpu")
    sys.argv = ["model_vqa_loader.py", *sys.argv[1:]]
    runpy.run_module("llava.eval.model_vqa_loader", run_name="__main__")
