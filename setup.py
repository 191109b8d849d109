from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="minifcn",
    version="0.1.0",
    description="Fully convolutional networks (FCN-32s/16s/8s) from scratch on NumPy and CuPy",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The CUDA sources in kernels/ ship inside the package as minifcn/kernels,
    # so an installed copy finds them (minifcn.backend.cuda.loader looks there first).
    packages=find_packages(include=["minifcn", "minifcn.*"]) + ["minifcn.kernels"],
    package_dir={"minifcn.kernels": "kernels"},
    package_data={"minifcn.kernels": ["*.cu", "*.h"]},
    # mpi4py and the mpich wheel (which brings mpiexec) run the data-parallel training
    # (minifcn.distributed); on Windows there is no mpich wheel, and training runs in one process.
    install_requires=["numpy>=1.22", "pillow>=9", "tqdm>=4.60", "safetensors>=0.4",
                      "threadpoolctl>=3.1", "mpi4py>=4.0; platform_system != 'Windows'",
                      "mpich>=4.2; platform_system != 'Windows'"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"],
        "cuda": ["cupy>=12"],
    },
    entry_points={"console_scripts": ["minifcn=minifcn.__main__:main"]},
)
