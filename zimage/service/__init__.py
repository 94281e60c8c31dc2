"""Turning requests into images: the engine facade, jobs and admission, the GPU runner, results, the PNG store."""
