"""Meta data: where the held-out meta batches come from (``meta_data``) and how they are loaded (``meta_loader``),
and the offline Fashion-MNIST root the quickstart, the tests and the benchmarks use (``fashion_mnist``).
"""
