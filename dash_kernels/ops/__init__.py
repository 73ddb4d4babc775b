"""One folder per op: interface (public function), reference, kernels, registration."""
