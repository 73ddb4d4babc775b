"""``python -m dash_kernels``: versions and the backends this install can run."""
import torch

from . import __version__, backend_report


def main() -> None:
    print(f"dash_kernels {__version__} (torch {torch.__version__})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        pass
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    for name, state in backend_report().items():
        print(f"  {name:<10} {state}")


if __name__ == "__main__":
    main()
