"""kdistill: knowledge distillation of image classifiers, measured end to end."""

from kdistill.api import Result, cache_teacher, distill, mutual, train
from kdistill.config import DataConfig, RunConfig, TrainConfig, load_config
from kdistill.data.dataset import ImageDataset, load_dataset
from kdistill.errors import KDistillError
from kdistill.methods import METHODS, kd_loss
from kdistill.models import MODELS, create_model
from kdistill.progress import quiet
from kdistill.teacher_cache import TeacherCache

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "MODELS",
    "DataConfig",
    "ImageDataset",
    "KDistillError",
    "Result",
    "RunConfig",
    "TrainConfig",
    "TeacherCache",
    "cache_teacher",
    "create_model",
    "distill",
    "kd_loss",
    "load_config",
    "load_dataset",
    "mutual",
    "quiet",
    "train",
]
