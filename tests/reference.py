"""Independent references for numbers stealnb reports, written from their definitions with
cleverhans 4's own FGSM and NumPy, never with stealnb's code: a test that compares the two fails
when the package's glue (which model, which labels, which eps) is wrong."""
import numpy as np
import tensorflow as tf
from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method


def fgsm(model, x, y, eps, batch_size=256):
    """``clip(x + eps * sign(grad_x CE(model(x), y)), 0, 1)`` by cleverhans' ``fast_gradient_method``
    (norm inf, the true labels ``y``), called eagerly on ``batch_size`` images at a time (the
    batches stealnb's attack uses, so both round alike)."""
    out = [fast_gradient_method(model, tf.constant(x[i : i + batch_size]), eps, np.inf, clip_min=0.0, clip_max=1.0,
                                y=tf.constant(y[i : i + batch_size], tf.int64)).numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


def labels(model, x, batch_size=256):
    return np.concatenate([np.asarray(model(x[i : i + batch_size], training=False)).argmax(1)
                           for i in range(0, len(x), batch_size)])


def transferability(secret, substitute, x, y, eps):
    """Thesis 000 §4.3/§7.2: FGSM crafted on the *substitute* with the *true* labels ``y``, labelled
    by both models. Among the examples that fool the substitute: the share the secret labels like
    the substitute (``adv_agreement``) and the share that fool the secret too (``transfer_rate``);
    over all: the secret's error (``secret_error_under_transfer``)."""
    x_adv = fgsm(substitute, x, y, eps)
    sub, sec = labels(substitute, x_adv), labels(secret, x_adv)
    fooled = sub != y
    some = bool(fooled.any())
    return {"adv_agreement": float(np.mean(sec[fooled] == sub[fooled])) if some else None,
            "transfer_rate": float(np.mean(sec[fooled] != y[fooled])) if some else None,
            "secret_error_under_transfer": float(np.mean(sec != y)), "fooled_substitute": int(fooled.sum()),
            "n": len(y), "eps": float(eps)}
