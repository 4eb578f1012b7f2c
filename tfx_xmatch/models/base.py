"""RetrievalModel: the TFRS base model with a train step that is right under tf.distribute."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs


class RetrievalModel(tfrs.models.Model):
    """``tfrs.models.Model`` whose gradient is the same with one replica or many.

    Keras optimizers sum the gradients of all replicas (``MirroredStrategy``,
    ``MultiWorkerMirroredStrategy``), and TFRS' ``train_step`` differentiates the per-replica
    mean loss as is, so N replicas would apply N times the mean gradient (an N-fold learning
    rate). Here the differentiated loss is divided by the number of replicas in sync; the
    reported losses are unchanged. Subclasses implement ``compute_loss`` as for TFRS.
    """

    def train_step(self, inputs):
        with tf.GradientTape() as tape:
            loss = self.compute_loss(inputs, training=True)
            regularization_loss = tf.reduce_sum([tf.reduce_sum(term) for term in self.losses])
            total_loss = loss + regularization_loss
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = total_loss / tf.cast(replicas, total_loss.dtype)
        gradients = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        metrics = {metric.name: metric.result() for metric in self.metrics}
        metrics.update(loss=loss, regularization_loss=regularization_loss, total_loss=total_loss)
        return metrics
