// The floor for bench/compile_time.sh: Eigen alone, one matrix product.
#include <Eigen/Core>

#include <iostream>

int main() {
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(10, 64);
  const Eigen::MatrixXf y = x * x.transpose();
  std::cout << y.sum() << "\n";
}
