// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11):
// a counter-based generator shared by random.metal and raytrace.metal.
#pragma once

// Round multipliers and key increments (a Weyl sequence).
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

inline uint4 philox_round(uint4 c, uint2 k) {
    uint hi0 = mulhi(PHILOX_M0, c.x), lo0 = PHILOX_M0 * c.x;
    uint hi1 = mulhi(PHILOX_M1, c.z), lo1 = PHILOX_M1 * c.z;
    return uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
}

// Ten rounds; the key is bumped between rounds.
inline uint4 philox4x32_10(uint4 c, uint2 k) {
    for (int round = 0; round < 9; ++round) {
        c = philox_round(c, k);
        k = uint2(k.x + PHILOX_W0, k.y + PHILOX_W1);
    }
    return philox_round(c, k);
}
