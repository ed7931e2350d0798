"""Training: LoRA, full finetuning and pretraining from scratch with one loop (loop.py), on data read by data.py,
run in the background by JobManager (jobs.py). `python -m backend finetune` is the command line."""
from ..errors import TrainError
from .bpe import train_tokenizer
from .checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint, save_checkpoint
from .config import DEFAULT_LR, MODES, TASKS, TrainConfig
from .data import Data, Records, Sequences, build_data, chat_sequence, read_records
from .jobs import JobManager
from .lora import add_lora, merge_lora
from ..scoring.validation import evaluate_classify, evaluate_loss
from .loop import lr_factor, train

__all__ = ["TrainConfig", "TrainError", "JobManager", "train", "read_records", "build_data", "chat_sequence",
           "train_tokenizer", "add_lora", "merge_lora", "evaluate_loss", "evaluate_classify", "lr_factor",
           "save_checkpoint", "read_checkpoint", "latest_checkpoint", "list_checkpoints", "Data", "Records",
           "Sequences", "MODES", "TASKS", "DEFAULT_LR"]
