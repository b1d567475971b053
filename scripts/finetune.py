"""Fine-tune with Lightning's CLI and a YAML recipe from configs/.

    python scripts/finetune.py fit --config configs/demo_rag.yaml
    python scripts/finetune.py fit --config configs/demo_rag.yaml --print_config
    python scripts/finetune.py test --config configs/demo_rag.yaml --ckpt_path PATH
"""

from trainers.cli import cli_main
from trainers.errors import run_cli

if __name__ == "__main__":
    run_cli(lambda argv: cli_main(argv), prog="finetune.py")
