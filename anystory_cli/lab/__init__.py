"""The lab behind the product: the sprite world the default model is trained on (`world`), its
base-model trainer (`train_base`), the independent judge (`judge`) and the evaluation that grades
the default model with it (`evaluate`). The product never imports from here."""
