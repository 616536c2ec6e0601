"""MLflow pyfunc model (models-from-code) of a model exported as an open_clip checkpoint (flexi_jest.export).

Self-contained: logged as a code file beside the export, it needs open_clip_torch, torch, pillow and pandas
in the serving environment, never flexi_jest. predict() embeds images and/or texts:

    input   a DataFrame (or a dict of lists) with an `image` column (base64-encoded image files: PNG, JPEG...)
            and/or a `text` column (strings); a row's missing value (None) is skipped
    output  a DataFrame with `image_embedding` and `text_embedding` (L2-normalised lists of floats, None where
            the row had no image / text), at the model's base patch size
"""

import base64
import io

import mlflow
import numpy as np
import pandas as pd
import torch
from PIL import Image

ARTIFACT = "open_clip"  # the artifact key of the open_clip export folder


class OpenClipEmbedder(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import open_clip

        folder = f"local-dir:{context.artifacts[ARTIFACT]}"
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(folder)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(folder)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if len(frame) == 1 and any(isinstance(v, (list, tuple, np.ndarray)) for v in frame.iloc[0]):
            # MLflow reads a dict of string lists as one row of lists: one row per item again
            frame = pd.DataFrame({c: list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v]
                                  for c, v in frame.iloc[0].items()})
        unknown = set(frame.columns) - {"image", "text"}
        if unknown or frame.empty:
            raise ValueError(f"expected an `image` and/or `text` column with at least one row; got columns "
                             f"{sorted(frame.columns)} and {len(frame)} rows")
        out = pd.DataFrame(index=frame.index)
        for column, embed in (("image", self._embed_images), ("text", self._embed_texts)):
            values = frame[column] if column in frame else pd.Series([None] * len(frame), index=frame.index)
            present = [i for i, value in values.items() if value is not None and value == value]
            embeddings: list = [None] * len(frame)
            if present:
                vectors = embed([values[i] for i in present])
                for i, vector in zip(present, vectors):
                    embeddings[frame.index.get_loc(i)] = vector.tolist()
            out[f"{column}_embedding"] = embeddings
        return out

    @torch.no_grad()
    def _embed_images(self, encoded: list) -> torch.Tensor:
        images = []
        for value in encoded:
            data = value if isinstance(value, (bytes, bytearray)) else base64.b64decode(value)
            images.append(self.preprocess(Image.open(io.BytesIO(data)).convert("RGB")))
        return self.model.encode_image(torch.stack(images), normalize=True).float()

    @torch.no_grad()
    def _embed_texts(self, texts: list) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer([str(t) for t in texts]), normalize=True).float()


mlflow.models.set_model(OpenClipEmbedder())
