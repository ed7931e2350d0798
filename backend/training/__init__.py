"""Training: LoRA, full finetuning and pretraining from scratch with one loop (loop.py; its set-up setup.py, its
losses objectives.py), on files read by backend/data and tokenized by data.py, run in the background by JobManager
(jobs.py). `python -m backend finetune` is the command line."""
from ..data.records import Records, read_records
from ..data.sequences import Sequences
from ..errors import TrainError
from .bpe import train_tokenizer
from .checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint, save_checkpoint
from .config import DEFAULT_LR, MODES, TASKS, TrainConfig
from .data import Data, build_data, chat_sequence
from .jobs import JobManager
from .lora import add_lora, merge_lora
from .loop import train
from .setup import lr_factor
from .validation import evaluate_classify, evaluate_loss

__all__ = ["TrainConfig", "TrainError", "JobManager", "train", "read_records", "build_data", "chat_sequence",
           "train_tokenizer", "add_lora", "merge_lora", "evaluate_loss", "evaluate_classify", "lr_factor",
           "save_checkpoint", "read_checkpoint", "latest_checkpoint", "list_checkpoints", "Data", "Records",
           "Sequences", "MODES", "TASKS", "DEFAULT_LR"]
