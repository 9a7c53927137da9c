"""A decoupled Triton Python model that streams like a TensorRT-LLM ensemble.

Copied into a model repository by tests/real/engines.py as ``model.py``. For
``max_tokens = N`` it sends N responses, one word each (a delta), then the
final flag; with ``stream: false`` one response holding the whole text, as
TensorRT-LLM does when streaming is off.
"""

import numpy as np
import triton_python_backend_utils as pb_utils


def _scalar(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    return tensor.as_numpy().reshape(-1)[0]


def _response(text):
    out = pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_))
    return pb_utils.InferenceResponse(output_tensors=[out])


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            prompt = _scalar(request, "text_input", b"")
            prompt = prompt.decode() if isinstance(prompt, bytes) else str(prompt)
            max_tokens = _scalar(request, "max_tokens")
            stream = bool(_scalar(request, "stream", True))
            refused = "[refuse]" in prompt  # a model error kvroute cannot foresee
            if max_tokens is None or int(max_tokens) < 0 or refused:
                why = "the model refuses this prompt" if refused else "max_tokens must be >= 0"
                error = pb_utils.TritonError(f"{why}, got {max_tokens}")
                sender.send(
                    pb_utils.InferenceResponse(error=error),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
                continue
            seed = len(prompt) % 7
            words = [f"w{(seed + i) % 10} " for i in range(int(max_tokens))]
            if stream:
                for word in words:
                    sender.send(_response(word))
            else:
                sender.send(_response("".join(words)))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
