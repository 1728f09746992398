"""Fake bench results shared by the test_bench_* files."""


def _quality_record(task, variant, seed, test, kept, wall=100.0, val=None):
    metric = {"mrpc": "f1", "rte": "accuracy", "cola": "matthews_correlation", "stsb": "pearson"}[task]
    return {"kind": "quality", "key": f"{task}-{variant}-s{seed}-e20", "task": task, "variant": variant,
            "method": variant.split("-")[0], "seed": seed, "epochs": 20.0, "model": "minilm", "protocol": "paper",
            "extra": {}, "wall_seconds": wall, "curve": None, "commit": "a" * 40, "machine": {"cores": 2},
            "metrics": {"main_metric": metric, "eval": {metric: val if val is not None else test},
                        "test": {metric: test}, "kept_params": kept, "lora_params_at_r_max": 2000,
                        "train_seconds": wall}}
