"""Tests for opq_tf.core.einsum: what an EinsumDense equation says."""

from absl.testing import absltest
from absl.testing import parameterized

from opq_tf.core import einsum


class EinsumTest(parameterized.TestCase):

  @parameterized.parameters(("abc,cde->abde", (-2, -1)),
                            ("abcd,cde->abe", (-1,)), ("ab,bc->ac", (-1,)),
                            ("ab,cb->ac", ()), ("...b,bc->...c", (-1,)),
                            ("abc, cd -> abd", (-1,)))
  def test_channel_axes(self, equation, axes):
    self.assertEqual(einsum.channel_axes(equation), axes)

  @parameterized.parameters(("abc,cde->abde", 1), ("abcd,cde->abe", 2),
                            ("ab,bc->ac", 1), ("ab,cb->ac", None),
                            ("abc,bcd->abd", None),  # b is kept, not led by c
                            ("abc,dc->abd", None))
  def test_contracted_dims(self, equation, dims):
    self.assertEqual(einsum.contracted_dims(equation), dims)

  def test_malformed_equation_says_the_form(self):
    with self.assertRaisesRegex(ValueError, "'<input>,<kernel>-><output>'"):
      einsum.channel_axes("abc->abd")


if __name__ == "__main__":
  absltest.main()
