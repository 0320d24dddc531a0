"""Training and evaluation on HF Accelerate: ``train(TrainConfig(...))``, ``evaluate_run(run)``.

>>> from vpeft.engine import TrainConfig, train
>>> results = train(TrainConfig(model="deit_tiny_patch16_224", data="data/cifar10",
...                             method="lora", method_args={"rank": 8}, out="runs/c10-lora"))
>>> results["top1"]
"""

from vpeft.engine.config import TrainConfig
from vpeft.engine.evaluate import EvalResult, evaluate, evaluate_run
from vpeft.engine.search import SearchConfig, search
from vpeft.engine.train import train

__all__ = ["EvalResult", "SearchConfig", "TrainConfig", "evaluate", "evaluate_run", "search",
           "train"]
