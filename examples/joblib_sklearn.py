"""scikit-learn's ``n_jobs`` on zpar: a grid search whose fits run on a zpar cluster.

    python examples/joblib_sklearn.py                       # a private cluster on this machine
    python examples/joblib_sklearn.py tcp://127.0.0.1:5555  # a running zpar-broker (see cluster_walkthrough.md)

Needs joblib and scikit-learn (``pip install 'zpar[joblib]' scikit-learn``),
on the workers' machines too.
"""

import sys
import time

import joblib
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

import zpar.joblib  # noqa: F401  (registers the joblib backend "zpar")

if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else None  # None: start a private cluster
    X, y = load_digits(return_X_y=True)
    grid = {"C": [0.1, 1, 10, 100], "gamma": [1e-4, 1e-3, 1e-2]}

    # Inside the block, every joblib.Parallel, and so every scikit-learn n_jobs,
    # runs on zpar; n_jobs=-1 means all the cluster's workers. The private
    # cluster starts at the first parallel call and stops after the block.
    # (With a zpar.Client of your own: parallel_config(backend="zpar", client=client).)
    start = time.perf_counter()
    with joblib.parallel_config(backend="zpar", address=address):
        search = GridSearchCV(SVC(), grid, cv=5, n_jobs=-1).fit(X, y)
    took = time.perf_counter() - start

    print(f"{len(search.cv_results_['params'])} candidates x 5 folds in {took:.1f} s")
    print(f"best parameters: {search.best_params_}, accuracy {search.best_score_:.3f}")
