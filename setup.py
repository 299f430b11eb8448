"""wildactor-kernels: Triton kernels and model optimizations for identity-preserving video DiTs."""

from setuptools import find_packages, setup

# One top-level import: the repository's model/ folder ships as the subpackage
# wildactor_kernels.model (docs/design.md §2). benchmarks/ and tests/ are not installed.
MODEL_PACKAGES = ["wildactor_kernels.model"] + [
    f"wildactor_kernels.model.{p}" for p in find_packages(where="model")
]

setup(
    name="wildactor-kernels",
    version="0.1.0",
    description=(
        "Triton kernels (I-RoPE, asymmetric attention, reference-only LoRA, FP8) and a reference "
        "WildActor video DiT with reference K/V cache, quantization and ONNX/TensorRT export."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["wildactor_kernels", "wildactor_kernels.*"]) + MODEL_PACKAGES,
    package_dir={"wildactor_kernels.model": "model"},
    # the attention dispatcher's measured table (docs/design.md §9)
    package_data={"wildactor_kernels.attention": ["backend_table.json"]},
    install_requires=[
        # The tested versions (README "Tested versions"): CI runs torch 2.13.0 (CPU) with
        # triton 3.9; the GPU machine has torch 2.11 with triton 3.6. Nothing older was tried.
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.10; platform_system=='Linux'",
        "einops>=0.7",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tqdm>=4.60",
    ],
    extras_require={
        # bitsandbytes is in the test extra too: its int8/NF4 paths (and a QLoRA-style training
        # step) are tested on the CPU; it installs nothing beyond itself on top of torch.
        # diffusers + transformers: the WanPipeline interop and WildActorPipeline tests build tiny
        # random Wan components (UMT5, AutoencoderKLWan) from configs, with no download.
        # peft (it brings accelerate): adapter files written by PEFT itself and by diffusers'
        # save_lora_weights are loaded and compared with PEFT's own layers.
        "test": ["pytest>=7", "hypothesis>=6", "diffusers>=0.33", "transformers>=4.45", "onnx>=1.17",
                 "onnxruntime>=1.20", "onnxscript>=0.2", "bitsandbytes>=0.45", "peft>=0.13"],
        # WildActorPipeline / WanPipeline interop (docs/design.md §11)
        "diffusers": ["diffusers>=0.33", "transformers>=4.45"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7"],
        "quant": ["bitsandbytes>=0.45"],
        "trt": ["tensorrt>=10.0"],
        "flash": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["wildactor=wildactor_kernels.model.cli:main"]},
    license="Apache-2.0",
)
