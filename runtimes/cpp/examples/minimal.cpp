// Classify one PGM/PPM image with a model written by `stn-deploy export`.
#include <iostream>

#include "stn/classifier.hpp"

int main(int argc, char** argv) {
    if (argc != 3) {
        std::cerr << "usage: " << argv[0] << " MODEL.onnx IMAGE.ppm\n";
        return 2;
    }
    try {
        auto clf = stn::Classifier::open(argv[1]);  // size, mean/std, classes: from metadata
        stn::Image image = stn::read_pnm(argv[2]);  // or fill stn::Image (HWC uint8) yourself
        auto pred = clf->classify({image}, /*top_k=*/3)[0];
        for (auto [cls, prob] : pred.top_k)
            std::cout << clf->class_names()[cls] << " " << prob << "\n";
    } catch (const stn::Error& e) {  // missing file, corrupt model, wrong size, ...
        std::cerr << "Error: " << e.what() << "\n";
        return 1;
    }
}
