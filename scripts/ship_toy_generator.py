"""Copy a trained toy generator into the package, weights stored as fp16 (loaded back as fp32)."""
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
import torch
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.rmtree(dst, ignore_errors=True)
(dst / "unet").mkdir(parents=True)
shutil.copytree(src / "scheduler", dst / "scheduler")
shutil.copy(src / "segsynth_generator.json", dst / "segsynth_generator.json")
shutil.copy(src / "unet" / "config.json", dst / "unet" / "config.json")
weights = load_file(str(src / "unet" / "diffusion_pytorch_model.safetensors"))
save_file({k: v.to(torch.float16) for k, v in weights.items()}, str(dst / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
print(sum(v.numel() for v in weights.values()), "parameters;", (dst / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size // 1024, "KiB")
