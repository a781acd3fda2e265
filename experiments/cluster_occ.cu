// Private experiment (fifteenth session): how many thread-block clusters of g = 1..16 one-pass
// fp8 blocks (1024 threads, 3 stages of K vectors a thread in shared memory) the GPU runs at once,
// as the launcher's cluster rule queries it (resident_clusters, cudaOccupancyMaxActiveClusters).
//   nvcc -arch=sm_90 -std=c++17 -O3 -Icsrc experiments/cluster_occ.cu -o /tmp/occ && /tmp/occ
#include "quant_all.cuh"

#include "exp_common.cuh"

int main() {
  using namespace kvk;
  cudaDeviceProp prop;
  kvkexp::start(prop);
  printf("clusters of g blocks that run at once (bf16; K = 1 / 2 / 4 vectors a thread)\n");
  for (int g = 1; g <= 16; ++g)
    printf("g=%2d: %3d %3d %3d  (SMs used at K=4: %d)\n", g, resident_clusters<BF16, 1>(g), resident_clusters<BF16, 2>(g),
           resident_clusters<BF16, 4>(g), g * resident_clusters<BF16, 4>(g));
  return 0;
}
